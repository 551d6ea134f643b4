"""The checkpoint manager: save, find, resume, roll back, retain, and this process's RNG.

It owns no state of its own: every piece it saves comes from a part's `state_dict()` and goes
back through its `load_state_dict()` — the step module (weights, fp32 master weights and Adam
moments as layout-independent fragments, parallel/state.py, plus the engine's counters), the
loader (its global position), the spike detector, the loop's counters, and the RNG of every
process. The directory format, the atomic commit and the verification are train/checkpoint_dir.py;
docs/checkpoints.md describes both. Followed torchtitan's CheckpointManager (one object the loop
calls with the step; everything saved is a state_dict of a part) with Megatron's
iteration-directory layout; the trainer calls `save()`, `restore()` and `load(latest())`.

Asynchronous saves (`checkpoint.async_save=true`), after torchtitan's / DCP's `async_save`: on the
training thread `save()` waits for the previous save of this rank, copies the step module's
fragments into an image of the rank file in host memory (parallel/state.py `RankImage`: the
file's bytes in file order, page-aligned, reused from save to save, pinned when CUDA is
available) and takes the trainer state, the RNG and the loader position; a background thread
then writes that image straight to disk (O_DIRECT, no staging copy, hashing as it goes, one
thread so that it takes at most one host core), fsyncs the rank's files and reports them to rank 0 through a small record file in the
temporary directory (no collective off the training thread). Rank 0's thread waits for every
rank's record, then writes the index, trainer.json and manifest and commits exactly as a
synchronous save does. `flush()` (collective) waits until the save in flight is committed.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data.durable import write_file_synced
from model.config import ConfigError
from parallel import state as pstate
from parallel.topology import Layout

from . import checkpoint_dir as ckpt


DELAY_ENV = "MOEFORGE_CHECKPOINT_DELAY_S"  # tests only: the background write starts this much later
RECORD_PREFIX = "records-"  # an asynchronous save's per-rank report to rank 0 (deleted before the manifest)
RECORD_TIMEOUT_S = 600.0  # rank 0 gives a save up when a rank's record has not come by then


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


def rng_state() -> dict:
    """This process's RNG states as JSON-able values (checkpoints load them without unpickling)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


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
        self._inflight: threading.Thread | None = None
        self._code: dict | None = None
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._image = pstate.RankImage()  # the asynchronous save's snapshot, reused across saves

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

    def trainer_state(self, code: bool = True) -> dict:
        """The flat trainer.json; `code=False` leaves the git state (subprocesses) for later."""
        L = self.layout
        return {"format_version": ckpt.FORMAT_VERSION, **self.progress.state_dict(), **self.steps.state_dict(),
                "spike": self.spike.state_dict(), "loader": self.loader.state_dict(),
                "layout": {"world": L.world, "pp": L.pp, "dp": L.dp, "ep": L.ep},
                "model": asdict(self.cfg.model), "config": asdict(self.cfg),
                "code": self.code_state() if code else None,
                "time": time.time()}

    def _paths(self) -> tuple[Path, Path, str]:
        name = ckpt.step_dir_name(self.progress.step)
        return self.root / f"{ckpt.TMP_PREFIX}{name}", self.root / name, name

    def _begin(self, tmp: Path) -> None:
        """Rank 0 clears stale temporaries and creates the save's temporary directory; barrier."""
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(self.root)
            tmp.mkdir()
        self._barrier()

    def _write_own(self, tmp: Path, frags, rng: dict) -> tuple[str, list, dict]:
        """This rank's state and RNG files, fsynced; (state file name, index rows, file records).
        `frags`: the live fragments (a synchronous save) or the snapshot's `RankImage`."""
        state_file = tmp / f"state-{self.rank:05d}.safetensors"
        crash = (lambda: self.faults.crash_point("writing")) if self.faults.armed("writing") else None
        if isinstance(frags, pstate.RankImage):
            rows, record = frags.write(state_file, crash=crash)
        else:
            rows, record = pstate.write_rank_file(state_file, frags, crash=crash)
        rng_file = tmp / f"rank-{self.rank:05d}.json"
        write_file_synced(rng_file, json.dumps(rng).encode())
        return state_file.name, rows, {state_file.name: record, **dict([ckpt.file_record(rng_file)])}

    def _commit(self, tmp: Path, final: Path, name: str, step: int, gathered: list, trainer: dict) -> None:
        """Rank 0: index, trainer.json, manifest, rename into place, pointer, retention."""
        all_shapes, all_records, files = {}, {}, {}
        for fname, r, sh, rec in gathered:
            all_shapes.update(sh)
            all_records.update(rec)
            files[fname] = r
        pstate.write_index(tmp / pstate.INDEX, all_shapes, files)
        write_file_synced(tmp / "trainer.json", json.dumps(trainer, indent=1).encode())
        all_records.update(dict(ckpt.file_record(tmp / n) for n in (pstate.INDEX, "trainer.json")))
        ckpt.write_manifest(tmp, all_records, step)
        self.faults.crash_point("manifest")
        ckpt.commit(tmp, final)
        self.faults.crash_point("renamed")
        ckpt.update_pointer(self.root, name)
        ckpt.retain(self.root, self.cfg.checkpoint.keep)

    def save(self) -> Path:
        """Every rank writes its files; rank 0 commits (train/checkpoint_dir.py). Returns the final path
        (with `async_save` it appears when the background write has committed: `flush()`)."""
        if self.async_save:
            return self._save_async()
        self.wait()  # none in flight unless async_save was switched off meanwhile
        tmp, final, name = self._paths()
        self._begin(tmp)
        frags, shapes = self.steps.fragments(*self._owners())
        fname, rows, records = self._write_own(tmp, frags, rng_state())
        gathered = self._gather((fname, rows, shapes, records))
        self.faults.crash_point("shards")
        if self.rank == 0:
            self._commit(tmp, final, name, self.progress.step, gathered, self.trainer_state())
        self._barrier()  # nobody reads or rolls back to it before it is in place
        return final

    # ------------------------------------------------------------------ asynchronous save
    def _save_async(self) -> Path:
        self.wait()
        tmp, final, name = self._paths()
        self._begin(tmp)
        frags, shapes = self.steps.fragments(*self._owners())
        self._image.fill(frags)  # the snapshot: the rank file's bytes in host memory (blocks training)
        snap = self._image
        rng = rng_state()
        trainer = self.trainer_state(code=False) if self.rank == 0 else None
        self._abort.clear()
        self._inflight = threading.Thread(target=self._background, name="checkpoint-writer", daemon=True,
                                          args=(tmp, final, name, self.progress.step, snap, shapes, rng, trainer))
        self._inflight.start()
        return final

    def _background(self, tmp, final, name, step, snap, shapes, rng, trainer) -> None:
        try:
            delay = float(os.environ.get(DELAY_ENV, "0") or 0)  # tests: a slow filesystem
            if delay:
                time.sleep(delay)
            fname, rows, records = self._write_own(tmp, snap, rng)
            record = tmp / f"{RECORD_PREFIX}{self.rank:05d}.json"
            part = record.with_name(record.name + ".part")
            write_file_synced(part, json.dumps([fname, rows, {k: list(v) for k, v in shapes.items()},
                                                records]).encode())
            os.replace(part, record)  # rank 0 never reads a partial record
            self.faults.crash_point("shards")
            if self.rank == 0:
                gathered = self._collect(tmp)
                trainer["code"] = self.code_state()  # git subprocesses (the first time): off the training thread
                self._commit(tmp, final, name, step, gathered, trainer)
        except BaseException as exc:  # re-raised on the training thread by wait()
            self._error = exc

    def _collect(self, tmp: Path) -> list:
        """Rank 0: every rank's record file (the all-gather of a synchronous save, via the directory)."""
        paths = [tmp / f"{RECORD_PREFIX}{r:05d}.json" for r in range(self.world)]
        deadline = time.monotonic() + RECORD_TIMEOUT_S
        while not all(p.is_file() for p in paths):
            if self._abort.is_set() or time.monotonic() > deadline:
                missing = [p.name for p in paths if not p.is_file()]
                raise ckpt.CheckpointError(f"{tmp}: save abandoned, no record from {', '.join(missing[:4])}")
            time.sleep(0.02)
        gathered = [json.loads(p.read_text()) for p in paths]
        for p in paths:
            p.unlink()  # not part of the checkpoint
        return gathered

    def wait(self) -> None:
        """Block until this rank's save in flight (if any) is done; raise its error here."""
        thread, self._inflight = self._inflight, None
        if thread is not None:
            thread.join()
        err, self._error = self._error, None
        if err is not None:
            raise err

    def flush(self) -> None:
        """Collective (with async_save): every rank's save in flight is committed when it returns."""
        if self.async_save:
            self.wait()
            self._barrier()

    def close(self) -> None:
        """Finish this rank's own files of a save in flight; rank 0 stops waiting for missing records
        (after an error exit some rank may never send one). Errors are reported, not raised."""
        self._abort.set()
        try:
            self.wait()
        except BaseException as exc:  # noqa: BLE001 - the process is leaving anyway
            import sys

            print(f"warning: checkpoint save in flight failed: {exc}", file=sys.stderr, flush=True)

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
