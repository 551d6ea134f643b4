"""The checkpoint manager: save, find, resume, roll back, retain, and this process's RNG.

It owns no state of its own: every piece it saves comes from a part's `state_dict()` and goes
back through its `load_state_dict()` — the step module (weights, fp32 master weights and Adam
moments as layout-independent fragments, parallel/state.py, plus the engine's counters), the
loader (its global position), the spike detector, the loop's counters, and the RNG of every
process. The directory format, the atomic commit and the verification are train/checkpoint_dir.py;
docs/checkpoints.md describes both. Followed torchtitan's CheckpointManager (one object the loop
calls with the step; everything saved is a state_dict of a part) with Megatron's
iteration-directory layout; the trainer calls `save()`, `restore()` and `load(latest())`.

Asynchronous saves (`checkpoint.async_save=true`), after torchtitan's / DCP's `async_save` with
a writer process (train/checkpoint_writer.py says why a process): on the training thread `save()`
waits for the previous save of this rank, lays out an image of the rank file in shared host
memory (parallel/snapshot.py `RankImage`: the file's bytes in file order, page-aligned, reused
from save to save, pinned on a GPU machine) and takes the trainer state, the RNG and the
loader position. A background thread copies the step module's fragments into the image while
the next step's forward and backward run — the optimizer update waits for it
(`snapshot_taken`, called by the step guard) — and hands the save to the rank's writer
process, which writes the image straight to disk (O_DIRECT, hashing as it goes), fsyncs the
rank's files and reports them to rank 0 through a small record file in the temporary
directory (no collective off the training thread). Rank 0's writer waits for every rank's
record, then writes the index, trainer.json and manifest and commits exactly as a synchronous
save does. `flush()` (collective) waits until the save in flight is committed.

Retention renames the checkpoints beyond `keep` out of resume's sight as part of the commit;
deleting their files (the kernel's work, ~14 ms for 28 MB here) happens on a thread (a
synchronous save) or in the writer process, not while training waits, as torchtitan's
checkpoint purge thread does.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from model.config import ConfigError
from parallel import snapshot
from parallel import state as pstate
from parallel.topology import Layout

from . import checkpoint_dir as ckpt
from . import checkpoint_writer as writer


def init_source(path: Path, model) -> str:
    """What `checkpoint.init_from=<path>` names, after the cheap checks (no hashing, no weights):
    "hf" (a Hugging Face folder), "checkpoint" (one moeforge checkpoint) or "root" (a directory
    of them; the newest that verifies is used). Raises a one-line error naming the path and the
    first architecture key that differs. Run before any worker starts (train/__main__.py) and
    again by each rank."""
    from model.hf_reader import SAME, check_compatible, is_hf_folder

    path = Path(path)
    if not path.is_dir():
        raise ckpt.CheckpointError(f"checkpoint.init_from={path}: no such folder")
    if is_hf_folder(path):
        check_compatible(path, model)
        return "hf"
    if (path / ckpt.MANIFEST).exists():
        ckpt.read_manifest(path)
        saved = ckpt.read_trainer_state(path).get("model", {})
        diff = ckpt.first_difference({k: saved.get(k) for k in SAME},
                                     {k: v for k, v in asdict(model).items() if k in SAME})
        if diff:
            raise ConfigError(f"checkpoint.init_from={path}: incompatible model: model.{diff}")
        return "checkpoint"
    newest = ckpt.complete_checkpoints(path)
    if newest:
        init_source(newest[-1], model)
        return "root"
    raise ckpt.CheckpointError(f"checkpoint.init_from={path}: neither a Hugging Face folder "
                               "(config.json) nor a moeforge checkpoint (manifest.json)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(packed: bool = False) -> dict:
    """This process's RNG states as JSON-able values (checkpoints load them without unpickling).
    `packed=True` gives the torch and CUDA states as hex strings instead of lists of bytes: a
    third of the JSON time when an asynchronous save hands them to the writer process, which
    unpacks them (train/checkpoint_writer.py `write_rng`) and writes the same file."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    enc = (lambda t: t.numpy().tobytes().hex()) if packed else (lambda t: t.tolist())
    return {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": enc(torch.get_rng_state()), "cuda": [enc(s) for s in cuda]}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


class CheckpointManager:
    """Checkpoints of one run under `root`; `parts` maps a part's name to its owner of state.

    parts: "steps" (the step module: `state_dict`, `load_state_dict(state, reader)`,
    `fragments(owner, expert_owner)`), "loader", "spike" and "progress" (each `state_dict` /
    `load_state_dict`). Their states are saved as the flat trainer.json of format version 1.
    """

    def __init__(self, cfg, root: Path, layout: Layout, rank: int, *, steps, loader, spike, progress, faults):
        self.cfg, self.root, self.layout, self.rank = cfg, root, layout, rank
        self.world = layout.world
        self.steps, self.loader, self.spike, self.progress, self.faults = steps, loader, spike, progress, faults
        self.resumed_from: Path | None = None
        self.async_save = bool(getattr(cfg.checkpoint, "async_save", False))
        self._code: dict | None = None
        self._image = snapshot.RankImage()  # the asynchronous save's snapshot, reused across saves
        self._writer: writer.WriterProcess | None = None  # started by the first asynchronous save
        self._purging: threading.Thread | None = None  # deleting retired checkpoints (synchronous saves)

    # ------------------------------------------------------------------ collectives
    def _gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _owners(self) -> tuple[bool, bool]:
        """(dense owner, expert owner): who writes replicated tensors when there is no ZeRO."""
        return self.layout.dp_rank_of(self.rank) == 0, self.layout.edp_ranks(self.rank)[0] == self.rank

    # ------------------------------------------------------------------ save
    def code_state(self) -> dict:
        """The git state of the code this process runs, read once (git subprocesses cost ~10 ms a
        save, and the running code does not change with the files after it was imported)."""
        from . import provenance

        if self._code is None:
            self._code = provenance.git_state()
        return self._code

    def trainer_state(self) -> dict:
        """The flat trainer.json."""
        L = self.layout
        return {"format_version": ckpt.FORMAT_VERSION, **self.progress.state_dict(), **self.steps.state_dict(),
                "spike": self.spike.state_dict(), "loader": self.loader.state_dict(),
                "layout": {"world": L.world, "pp": L.pp, "dp": L.dp, "ep": L.ep},
                "model": asdict(self.cfg.model), "config": asdict(self.cfg),
                "code": self.code_state(),
                "time": time.time()}

    def _paths(self) -> tuple[Path, Path, str]:
        name = ckpt.step_dir_name(self.progress.step)
        return self.root / f"{ckpt.TMP_PREFIX}{name}", self.root / name, name

    def _begin(self, tmp: Path) -> None:
        """Rank 0 clears stale temporaries and creates the save's temporary directory; barrier."""
        if self.rank == 0:
            self._join_purge()
            self.root.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(self.root)
            tmp.mkdir()
        self._barrier()

    def _join_purge(self) -> None:
        if self._purging is not None:
            self._purging.join()
            self._purging = None

    def _kills(self) -> list[str]:
        """The save phases at which fault injection kills this rank during this save."""
        phases = ["writing", "shards"] + (["manifest", "renamed"] if self.rank == 0 else [])
        return [p for p in phases if self.faults.fires(p)]

    def save(self) -> Path:
        """Every rank writes its files; rank 0 commits (train/checkpoint_dir.py). Returns the final path
        (with `async_save` it appears when the background write has committed: `flush()`)."""
        if self.async_save:
            return self._save_async()
        self.wait()  # none in flight unless async_save was switched off meanwhile
        tmp, final, name = self._paths()
        self._begin(tmp)
        frags, shapes = self.steps.fragments(*self._owners())
        state_file = tmp / f"state-{self.rank:05d}.safetensors"
        crash = (lambda: self.faults.crash_point("writing")) if self.faults.armed("writing") else None
        rows, record = pstate.write_rank_file(state_file, frags, crash=crash)
        rng_name, rng_record = writer.write_rng(tmp, self.rank, rng_state())
        gathered = self._gather((state_file.name, rows, shapes, {state_file.name: record, rng_name: rng_record}))
        self.faults.crash_point("shards")
        if self.rank == 0:
            retired = writer.commit_save(tmp, final, self.progress.step, gathered, self.trainer_state(),
                                         self.cfg.checkpoint.keep, self.faults.crash_point)
            if retired:
                self._purging = threading.Thread(target=writer.purge, args=(retired,), name="checkpoint-purge",
                                                 daemon=True)
                self._purging.start()
        self._barrier()  # nobody reads or rolls back to it before it is in place
        return final

    # ------------------------------------------------------------------ asynchronous save
    def _save_async(self) -> Path:
        self.wait()
        tmp, final, name = self._paths()
        self._begin(tmp)
        frags, shapes = self.steps.fragments(*self._owners())
        self._image.prepare(frags)  # the layout, and the shared memory the writer maps
        if self._writer is not None and self._writer.image_fd != self._image.fd:  # the image was reallocated
            self._writer.stop()
            self._writer = None
        if self._writer is None:
            self._writer = writer.WriterProcess(self._image.fd)
        job = {"op": "save", "tmp": str(tmp), "final": str(final), "step": self.progress.step, "rank": self.rank,
               "world": self.world, "keep": self.cfg.checkpoint.keep, "size": self._image.size,
               "rows": self._image.rows, "shapes": shapes, "rng": rng_state(packed=True),
               "trainer": self.trainer_state() if self.rank == 0 else None, "kill": self._kills()}
        # The snapshot: the fragments' bytes copied into the shared image on a background thread
        # while the next step's forward and backward run; `snapshot_taken()` holds the optimizer
        # update until the copy is done, and the copy hands the save to the writer process.
        self._image.fill(then=lambda: self._writer.submit(job))
        return final

    def snapshot_taken(self) -> None:
        """Block until the snapshot of an asynchronous save is copied: called right before every
        optimizer update (train/step.py), since the update changes the tensors it copies."""
        self._image.settle()

    def in_flight(self) -> bool:
        """Whether this rank's asynchronous save is still being copied or written (without waiting)."""
        return self._image.copying() or (self._writer is not None and not self._writer.done())

    def wait(self) -> None:
        """Block until this rank's save in flight (if any) is done; raise its error here."""
        self._image.settle()
        if self._writer is not None:
            self._writer.result()

    def settle(self) -> None:
        """Wait for everything this rank's saves started: the save in flight and the deletion of
        retired checkpoints (bench/checkpoint.py counts both in the save's window)."""
        self.wait()
        self._join_purge()

    def flush(self) -> None:
        """Collective (with async_save): every rank's save in flight is committed when it returns."""
        if self.async_save:
            self.wait()
            self._barrier()

    def close(self) -> None:
        """Finish this rank's own files of a save in flight; rank 0 stops waiting for missing records
        (after an error exit some rank may never send one); stop the writer process and finish
        deleting retired checkpoints. Errors are reported, not raised."""
        import sys

        try:
            self._image.settle()
        except BaseException as exc:  # noqa: BLE001 - the process is leaving anyway
            print(f"warning: checkpoint snapshot in flight failed: {exc}", file=sys.stderr, flush=True)
        if self._writer is not None:
            self._writer.abort()
            try:
                self._writer.result()
            except BaseException as exc:  # noqa: BLE001 - the process is leaving anyway
                print(f"warning: checkpoint save in flight failed: {exc}", file=sys.stderr, flush=True)
            self._writer.stop()
            self._writer = None
        self._image.close()
        self._join_purge()

    # ------------------------------------------------------------------ find and load
    def latest(self) -> Path | None:
        """The newest complete checkpoint under root that verifies (hashing shared by the ranks)."""
        return ckpt.select(self.root, self.rank, self.world, self._gather if self.world > 1 else None)

    def _requested(self) -> Path | None:
        """The checkpoint to start from: resume=auto → newest verified in root; <path> → that one."""
        how = self.cfg.checkpoint.resume
        if how == "never":
            return None
        if how == "auto":
            return self.latest()
        path = Path(how)
        if not path.is_dir():
            raise ckpt.CheckpointError(f"checkpoint.resume={how}: no such checkpoint directory")
        ckpt.verify(path, self.rank, self.world, self._gather if self.world > 1 else None)
        return path

    def restore(self) -> Path | None:
        """Resume as `checkpoint.resume` asks: everything, the loader's position included (but
        `checkpoint.reset_optimizer` / `reset_data`); with nothing to resume, `init_from`'s weights."""
        c = self.cfg.checkpoint
        path = self._requested()
        if path is not None:
            self.load(path, with_loader=not c.reset_data, with_optimizer=not c.reset_optimizer)
            self.resumed_from = path
            if self.rank == 0:
                resets = [k for k in ("reset_optimizer", "reset_data") if getattr(c, k)]
                print(f"resumed from {path} at step {self.progress.step}"
                      + (f" ({', '.join(resets)})" if resets else ""), flush=True)
        elif c.init_from:
            self.init_weights(Path(c.init_from))
        return path

    def init_weights(self, path: Path) -> Path:
        """The weights of a Hugging Face folder or a moeforge checkpoint, nothing else: each rank
        reads only the ranges it holds (parallel/state.py `restore`; model/hf_reader.py)."""
        from model.hf_reader import HFRangeReader

        gather = self._gather if self.world > 1 else None
        kind = init_source(path, self.cfg.model)
        if kind == "hf":
            reader = HFRangeReader(path, self.cfg.model)
        else:
            if kind == "root":
                chosen = ckpt.select(path, self.rank, self.world, gather)
                if chosen is None:
                    raise ckpt.CheckpointError(f"checkpoint.init_from={path}: no checkpoint in it verifies")
                path = chosen
                init_source(path, self.cfg.model)
            else:
                ckpt.verify(path, self.rank, self.world, gather)
            reader = pstate.Reader(path)
        self.steps.load_state_dict(self.steps.state_dict(), pstate.WeightsOnly(reader))
        if self.rank == 0:
            print(f"initialized weights from {path}", flush=True)
        return path

    def load(self, path: Path, *, with_loader: bool, with_optimizer: bool = True) -> dict:
        """Weights, optimizer state, counters and RNG of `path` into this (possibly other) layout.

        A rollback keeps the loader where it is (with_loader=False): the data since `path` is skipped.
        with_optimizer=False keeps this run's (fresh) Adam moments."""
        self._image.settle()  # a snapshot still copying reads the tensors this overwrites
        state = ckpt.read_trainer_state(path)
        diff = ckpt.first_difference(state.get("model", {}), asdict(self.cfg.model))
        if diff:
            raise ConfigError(f"checkpoint {path}: incompatible model: model.{diff}")
        reader = pstate.Reader(path)
        self.steps.load_state_dict(state, reader if with_optimizer else pstate.WeightsOnly(reader))
        self.progress.load_state_dict(state)
        self.spike.load_state_dict(state.get("spike", {}))
        rng_file = path / f"rank-{self.rank:05d}.json"
        if rng_file.is_file():
            set_rng_state(json.loads(rng_file.read_text()))
        else:  # more ranks than the saving layout had: a fresh, rank-distinct seed
            seed_everything(self.cfg.trainer.seed + 1000003 * (self.rank + 1) + self.progress.step)
        if with_loader:
            self.loader.load_state_dict(state["loader"])
        return state
