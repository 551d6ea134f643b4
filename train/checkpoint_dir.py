"""Checkpoint directories: atomic commit, manifest verification, retention, resume selection.

Layout of `checkpoint.dir`:

    step-00001000/            a complete checkpoint (only ever appears by rename)
        manifest.json         every other file's size and SHA-256 (written last, before the rename)
        trainer.json          step, tokens, loader position, spike detector, resolved config, code version
        index.json            global shapes and which file holds which range (parallel/state.py)
        state-00000.safetensors …   each rank's fragments of weights, fp32 master weights, Adam moments
        rank-00000.json …     each rank's RNG states (python, numpy, torch CPU and CUDA)
    latest                    name of the newest complete checkpoint (write-temp, fsync, rename)
    .tmp-step-00001000/       a save in progress (or one that crashed: ignored, removed by the next save)

Commit (docs/checkpoints.md): every rank writes its files into the temporary directory and fsyncs them;
barrier; rank 0 hashes nothing itself — each rank reports its files' sizes and SHA-256 — writes
the manifest, fsyncs, renames the directory into place, fsyncs the parent, then updates
`latest`. A crash at any moment leaves either the previous set of complete checkpoints or that
set plus the new one. Retention deletes the oldest complete checkpoints beyond `keep` only after
the new one is in place, and never the newest.

Resume: `auto` takes the newest `step-*` whose manifest verifies (sizes and hashes, checked in
parallel: rank r hashes files r, r + world, …); one that fails is skipped with a warning naming
the file. The `latest` pointer is what outside tools read; resume does not need it, so a crash
between the rename and the pointer update loses nothing. Followed Megatron's tracker-file +
iteration-directory convention and torchtitan's step-N folders; the manifest is ours (neither
verifies content).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

from data.durable import fsync_path, replace_dir, write_bytes_durable, write_file_synced
from data.errors import UserError

MANIFEST = "manifest.json"
INDEX = "index.json"  # parallel/state.py reads it (the same name there)
POINTER = "latest"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint that cannot be used (one line naming the path or file)."""


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path) -> tuple[str, dict]:
    fsync_path(path)
    return path.name, {"size": path.stat().st_size, "sha256": sha256_file(path)}


def write_small_file(path: Path, data: bytes) -> tuple[str, dict]:
    """Write `data` durably and return its manifest record from the bytes in hand (no re-read)."""
    write_file_synced(path, data)
    return path.name, {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_manifest(tmp: Path, records: dict[str, dict], step: int) -> None:
    body = {"format_version": FORMAT_VERSION, "step": step, "files": dict(sorted(records.items()))}
    write_file_synced(tmp / MANIFEST, json.dumps(body, indent=1).encode())
    fsync_path(tmp)


def write_index(path: Path, shapes: dict, files: dict[str, list[list]]) -> tuple[str, dict]:
    """index.json: every tensor's global shape and which file holds which range of it (the rows
    [kind, name, start, numel] of each rank file; parallel/state.py `Reader` reads it)."""
    entries: dict[str, dict[str, list]] = {}
    for fname, rows in sorted(files.items()):
        for kind, name, start, numel in rows:
            entries.setdefault(kind, {}).setdefault(name, []).append([start, numel, fname])
    for per_kind in entries.values():
        for frs in per_kind.values():
            frs.sort()
    # Compact: json's C encoder (an indented dump runs the pure-Python one, ~7 ms at the smoke size).
    return write_small_file(path, json.dumps({"format_version": 1, "shapes": {k: list(v) for k, v in shapes.items()},
                                        "fragments": entries}, sort_keys=True, separators=(",", ":")).encode())


def commit(tmp: Path, final: Path) -> None:
    """Rename the finished temporary directory into place (durably). A save of the same step (a
    rollback re-reached it) replaces the old one, which waits at `.tmp-old-<name>` meanwhile."""
    trash = final.with_name(f"{TMP_PREFIX}old-{final.name}")
    shutil.rmtree(trash, ignore_errors=True)  # left by a crash
    replace_dir(tmp, final, aside=trash)


def update_pointer(root: Path, name: str) -> None:
    write_bytes_durable(root / POINTER, (name + "\n").encode(), tmp=root / f"{TMP_PREFIX}{POINTER}")


def complete_checkpoints(root: Path) -> list[Path]:
    """Renamed-into-place checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit():
            found.append(p)
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def retain(root: Path, keep: int, *, delete: bool = True) -> list[Path]:
    """Retire the oldest complete checkpoints beyond `keep` (never the newest): each is renamed out
    of resume's sight (`.tmp-del-<name>`), then deleted. `delete=False` leaves the deletion to the
    caller (a thread: deleting gigabytes takes the kernel a while and nothing waits for it) and
    returns the renamed paths; a deletion that never happens is finished by the next save's
    `remove_stale_temporaries`. Returns the retired paths."""
    trash = []
    for p in complete_checkpoints(root)[:-max(keep, 1)]:
        trash.append(p.with_name(f"{TMP_PREFIX}del-{p.name}"))
        p.rename(trash[-1])
        if delete:
            shutil.rmtree(trash[-1], ignore_errors=True)
    return trash


def remove_stale_temporaries(root: Path) -> None:
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def read_manifest(path: Path) -> dict:
    try:
        body = json.loads((path / MANIFEST).read_text())
        files = body["files"]
        if not isinstance(files, dict):
            raise ValueError("files is not a mapping")
        return body
    except FileNotFoundError:
        raise CheckpointError(f"{path / MANIFEST}: missing (an incomplete checkpoint)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / MANIFEST}: unreadable ({exc})") from None


def verify_files(path: Path, names: list[str], files: dict) -> str | None:
    """The first problem among `names` (size, then SHA-256), or None."""
    for name in names:
        rec = files[name]
        f = path / name
        if not f.is_file():
            return f"{f}: missing"
        if f.stat().st_size != rec["size"]:
            return f"{f}: size {f.stat().st_size} bytes, the manifest says {rec['size']}"
        if sha256_file(f) != rec["sha256"]:
            return f"{f}: SHA-256 does not match the manifest (corrupted)"
    return None


def verify(path: Path, rank: int = 0, world: int = 1, gather=None) -> None:
    """Raise CheckpointError naming the first bad file; ranks share the hashing when `gather` is given.

    `gather(obj) -> list` all-gathers a Python object over the ranks (None in one process).
    """
    files = read_manifest(path)["files"]
    names = sorted(files)
    problem = verify_files(path, names[rank::world] if gather else names, files)
    problems = gather(problem) if gather else [problem]
    bad = [p for p in problems if p]
    if bad:
        raise CheckpointError(sorted(bad)[0])
    extra = {"trainer.json", "index.json"} - set(names)
    if extra:
        raise CheckpointError(f"{path / MANIFEST}: does not list {', '.join(sorted(extra))}")


def select(root: Path, rank: int = 0, world: int = 1, gather=None, warn=None) -> Path | None:
    """The newest complete checkpoint under root that verifies; None when there is none."""
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    for path in reversed(complete_checkpoints(root)):
        try:
            verify(path, rank, world, gather)
            return path
        except CheckpointError as exc:
            if rank == 0:
                warn(f"skipping checkpoint {path.name}: {exc}")
    return None


def read_trainer_state(path: Path) -> dict:
    try:
        return json.loads((path / "trainer.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / 'trainer.json'}: unreadable ({exc})") from None


def first_difference(saved: dict, current: dict, prefix: str = "") -> str | None:
    """The first differing field between two nested dicts, as `a.b: saved X, now Y`."""
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            return f"{prefix}{key} is {a!r} in the checkpoint but {b!r} now"
    return None


def precheck(resume: str, model: dict) -> None:
    """Cheap checks of an explicit `checkpoint.resume=<path>` before any process starts (no hashing)."""
    if resume in ("auto", "never"):
        return
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.resume={resume}: no such checkpoint directory")
    read_manifest(path)
    diff = first_difference(read_trainer_state(path).get("model", {}), model)
    if diff:
        raise CheckpointError(f"checkpoint {path}: incompatible model: model.{diff}")
