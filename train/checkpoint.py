"""The checkpoint manager: save, find, resume, roll back, retain, and this process's RNG.

It owns no state of its own: every piece it saves comes from a part's `state_dict()` and goes
back through its `load_state_dict()` — the step module (weights, fp32 master weights and Adam
moments as layout-independent fragments, parallel/state.py, plus the engine's counters), the
loader (its global position), the spike detector, the loop's counters, and the RNG of every
process. The directory format, the atomic commit and the verification are train/checkpoint_dir.py;
docs/checkpoints.md describes both. Followed torchtitan's CheckpointManager (one object the loop
calls with the step; everything saved is a state_dict of a part) with Megatron's
iteration-directory layout; the trainer calls `save()`, `restore()` and `load(latest())`.
"""

from __future__ import annotations

import json
import random
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
    def trainer_state(self) -> dict:
        from . import provenance

        L = self.layout
        return {"format_version": ckpt.FORMAT_VERSION, **self.progress.state_dict(), **self.steps.state_dict(),
                "spike": self.spike.state_dict(), "loader": self.loader.state_dict(),
                "layout": {"world": L.world, "pp": L.pp, "dp": L.dp, "ep": L.ep},
                "model": asdict(self.cfg.model), "config": asdict(self.cfg), "code": provenance.git_state(),
                "time": time.time()}

    def save(self) -> Path:
        """Every rank writes its files; rank 0 commits (train/checkpoint_dir.py). Returns the final path."""
        root, name = self.root, ckpt.step_dir_name(self.progress.step)
        tmp, final = root / f"{ckpt.TMP_PREFIX}{name}", root / name
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(root)
            tmp.mkdir()
        self._barrier()
        frags, shapes = self.steps.fragments(*self._owners())
        state_file = tmp / f"state-{self.rank:05d}.safetensors"
        rows = pstate.write_rank_file(state_file, frags, crash=lambda: self.faults.crash_point("writing"))
        rng_file = tmp / f"rank-{self.rank:05d}.json"
        write_file_synced(rng_file, json.dumps(rng_state()).encode())
        records = dict(ckpt.file_record(f) for f in (state_file, rng_file))
        gathered = self._gather((state_file.name, rows, shapes, records))
        self.faults.crash_point("shards")
        if self.rank == 0:
            all_shapes, all_records, files = {}, {}, {}
            for fname, r, sh, rec in gathered:
                all_shapes.update(sh)
                all_records.update(rec)
                files[fname] = r
            pstate.write_index(tmp / pstate.INDEX, all_shapes, files)
            write_file_synced(tmp / "trainer.json", json.dumps(self.trainer_state(), indent=1).encode())
            all_records.update(dict(ckpt.file_record(tmp / n) for n in (pstate.INDEX, "trainer.json")))
            ckpt.write_manifest(tmp, all_records, self.progress.step)
            self.faults.crash_point("manifest")
            ckpt.commit(tmp, final)
            self.faults.crash_point("renamed")
            ckpt.update_pointer(root, name)
            ckpt.retain(root, self.cfg.checkpoint.keep)
        self._barrier()  # nobody reads or rolls back to it before it is in place
        return final

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
        """Resume as `checkpoint.resume` asks: everything, the loader's position included."""
        path = self._requested()
        if path is not None:
            self.load(path, with_loader=True)
            self.resumed_from = path
            if self.rank == 0:
                print(f"resumed from {path} at step {self.progress.step}", flush=True)
        return path

    def load(self, path: Path, *, with_loader: bool) -> dict:
        """Weights, optimizer state, counters and RNG of `path` into this (possibly other) layout.

        A rollback keeps the loader where it is (with_loader=False): the data since `path` is skipped."""
        state = ckpt.read_trainer_state(path)
        diff = ckpt.first_difference(state.get("model", {}), asdict(self.cfg.model))
        if diff:
            raise ConfigError(f"checkpoint {path}: incompatible model: model.{diff}")
        self.steps.load_state_dict(state, pstate.Reader(path))
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
