"""`parallel.deepspeed`: DeepSpeed settings passed through into the generated config, checked early.

The trainer's validation (train/config.py `validate`) calls `check_deepspeed` before any process
group exists: a key moeforge sets itself (DEEPSPEED_OWNED) is refused with the moeforge key to use
instead, and the merged config is built by DeepSpeed's own `DeepSpeedConfig`, so an unknown or
ill-typed key is one line naming it. parallel/engine.py `deepspeed_config(extra=…)` does the merge.
"""

from __future__ import annotations

from model.config import ConfigError


# DeepSpeed config keys moeforge sets from its own config (parallel/engine.py `deepspeed_config`),
# with the key to use instead; `parallel.deepspeed` may not set them or anything under them.
DEEPSPEED_OWNED = {
    "train_batch_size": "trainer.global_batch_size",
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "gradient_accumulation_steps": "trainer.global_batch_size",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "parallel.zero_stage",
    "optimizer": "optim.*",
    "scheduler": "schedule.*",
    "bf16": "trainer.dtype",
    "fp16": "trainer.dtype",
    "data_types": "trainer.dtype",
}


class _KeysRead(dict):
    """A dict that records which of its keys are looked up (DeepSpeed reads its top-level keys
    one by one and ignores the others; a shallow copy shares the record)."""

    def __init__(self, data: dict):
        super().__init__(data)
        self.read: set = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)

    def pop(self, key, *default):
        self.read.add(key)
        return super().pop(key, *default)

    def setdefault(self, key, default=None):
        self.read.add(key)
        return super().setdefault(key, default)

    def keys(self):  # `key in config.keys()` is DeepSpeed's usual test
        outer = self

        class Keys:
            def __contains__(self, key):
                outer.read.add(key)
                return dict.__contains__(outer, key)

            def __iter__(self):
                return iter(dict.keys(outer))

            def __len__(self):
                return dict.__len__(outer)

        return Keys()


def _owned_conflict(extra: dict) -> str | None:
    """The first `parallel.deepspeed` key that would change one of DEEPSPEED_OWNED, as an error line."""
    for owned, ours in DEEPSPEED_OWNED.items():
        node, path = extra, []
        for name in owned.split("."):
            if not isinstance(node, dict) or name not in node:
                break
            path.append(name)
            node = node[name]
            if path == owned.split(".") or not isinstance(node, dict):  # a non-mapping replaces ours whole
                use = "those keys" if ours.endswith("*") else "that key"
                return f"parallel.deepspeed.{'.'.join(path)}: set by moeforge from {ours}; use {use}"
    return None


def _key_paths(node: dict, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a nested dict, deepest first."""
    out = []
    for key, value in node.items():
        out += (_key_paths(value, prefix + (key,)) if isinstance(value, dict) else []) + [prefix + (key,)]
    return out


def _deepspeed_error(exc: Exception, extra: dict, version: str) -> str:
    """One line from DeepSpeed's refusal of the merged config, naming the user's key where it can."""
    def lookup(path: tuple):
        node = extra
        for name in path:
            if not isinstance(node, dict) or name not in node:
                return None
            node = node[name]
        return path

    errors = getattr(exc, "errors", None)
    if callable(errors):  # pydantic: DeepSpeed's section models forbid unknown keys
        first = errors()[0]
        loc = tuple(str(x) for x in first.get("loc", ()))
        sections = [(name,) + loc for name, value in extra.items() if isinstance(value, dict)]
        path = next((p for p in [loc] + sections if lookup(p)), None)
        name = "parallel.deepspeed." + ".".join(path) if path else f"parallel.deepspeed ({exc.title}: {'.'.join(loc)})"
        if first.get("type") == "extra_forbidden":
            return f"{name}: not a DeepSpeed {version} config key"
        return f"{name}={first.get('input')!r}: {first.get('msg')}"
    msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    path = next((p for p in _key_paths(extra) if str(p[-1]) in msg), None)
    if path:
        return f"parallel.deepspeed.{'.'.join(map(str, path))}: {msg}"
    return f"parallel.deepspeed: {msg}"


def check_deepspeed(cfg) -> None:
    """`parallel.deepspeed` against the keys moeforge sets and DeepSpeed's own config schema.

    DeepSpeed builds its config (deepspeed.runtime.config.DeepSpeedConfig) from the merged dict
    here, before any process group: its sections that are pydantic models refuse unknown keys and
    wrong types, and a top-level key it never looks up is unknown. Keys inside the sections
    DeepSpeed reads as plain dicts (flops_profiler, activation_checkpointing, checkpoint, …) are
    not checked: DeepSpeed itself ignores the ones it does not know.
    """
    extra = cfg.parallel.deepspeed
    if not extra:
        return
    bad = _owned_conflict(extra)
    if bad:
        raise ConfigError(bad)
    import difflib
    import logging
    import os

    import torch

    from parallel.engine import resolve_device, resolve_dtype

    device = resolve_device(cfg.trainer.device)
    if device.type == "cpu":  # as train/__main__.py does before DeepSpeed's first import
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig

    from parallel.engine import deepspeed_config

    from parallel.topology import Layout

    t, p = cfg.trainer, cfg.parallel
    layout = Layout(int(os.environ.get("WORLD_SIZE", 1)), p.pp, p.ep)  # the launch's world (train/__main__.py)
    bf16 = resolve_dtype(t.dtype, device) == torch.bfloat16
    merged = _KeysRead(deepspeed_config(
        micro_batch_size=t.micro_batch_size, grad_accum=1, zero_stage=layout.zero_stage(p.zero_stage, bf16),
        grad_clip=cfg.optim.grad_clip, bf16=bf16, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay, device_type=device.type, extra=extra))
    ds_logger = logging.getLogger("DeepSpeed")
    level = ds_logger.level
    ds_logger.setLevel(logging.ERROR)
    try:
        DeepSpeedConfig(merged)
    except Exception as exc:  # DeepSpeed raises pydantic, ValueError, AssertionError, its own errors
        raise ConfigError(_deepspeed_error(exc, extra, deepspeed.__version__)) from None
    finally:
        ds_logger.setLevel(level)
    for key in extra:
        if key not in merged.read:
            close = difflib.get_close_matches(key, sorted(map(str, merged.read)), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"parallel.deepspeed.{key}: not a DeepSpeed {deepspeed.__version__} config key{hint}")
