"""A run: a name, a directory that is the same for every launch of the same command, and a log of starts.

`python -m train +experiment=smoke` started again continues: the run directory is
`runs/<run.name>` (unless `hydra.run.dir` says otherwise), its checkpoints are under it, and
`checkpoint.resume=auto` picks the newest. The name defaults to the experiment's name, else the
model preset's. As in torchtitan and OLMo-core, the save folder *is* the run's identity.

Each start appends one record to `<run dir>/starts.jsonl` (time, commit, layout, restart count,
the checkpoint it resumed from, the keys that changed since the first start) and one more when
it ends (exit code, step). config.yaml and provenance.json keep the first start's. A start whose
config differs from the run's first in a key that changes the model or the data order is refused
with one line naming the keys (`+run.allow_config_change=true` overrides); other keys (layout,
max_steps, intervals, batch ramp…) may change and are recorded. A run whose last starts all
failed at the same step is not started again (the launchers would otherwise loop).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from model.config import ConfigError

STARTS = "starts.jsonl"
ALLOW_CONFIG_CHANGE = "+run.allow_config_change=true"
# Keys whose change makes it another run: the model, the data and its order.
FIXED = ("model.", "data.path", "data.sources", "data.seed", "data.fim", "data.document_aware", "trainer.seed",
         "trainer.seq_len", "trainer.global_batch_size", "run.")
MAX_SAME_STEP_FAILURES = int(os.environ.get("MOEFORGE_MAX_SAME_STEP_FAILURES", 3))


def default_name(overrides: list[str]) -> str:
    """The experiment's name (`+experiment=x`), else the model preset's (`model=y`), else `smoke`."""
    found = {}
    for item in overrides:
        key, _, value = item.lstrip("+~").partition("=")
        if key in ("experiment", "model") and value:
            found[key] = value
    return found.get("experiment") or found.get("model") or "smoke"


def resolve_run_dir(arg: str | None, name: str) -> Path:
    """`hydra.run.dir` (interpolations such as ${now:%Y-%m-%d} resolved), else runs/<name>
    ($MOEFORGE_RUNS/<name> when that is set: the test suite keeps its runs out of the tree)."""
    if not arg:
        return Path(os.environ.get("MOEFORGE_RUNS", "runs")) / name
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not OmegaConf.has_resolver("now"):
        OmegaConf.register_new_resolver("now", lambda pattern: time.strftime(pattern))
    try:
        return Path(str(OmegaConf.create({"dir": arg}).dir))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"hydra.run.dir={arg}: {exc}") from None


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def config_changes(run_dir: Path, resolved_yaml: str, allow: bool) -> dict:
    """Keys that differ from the run's first start, as {key: [then, now]}; ConfigError for a fixed one."""
    first = run_dir / "config.yaml"
    if not first.is_file():
        return {}
    import yaml

    then, now = _flat(yaml.safe_load(first.read_text()) or {}), _flat(yaml.safe_load(resolved_yaml) or {})
    changed = {k: [then.get(k), now.get(k)] for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)}
    fixed = [k for k in changed if k.startswith(FIXED) or k in FIXED]
    if fixed and not allow:
        shown = ", ".join(f"{k} ({changed[k][0]!r} → {changed[k][1]!r})" for k in fixed[:4])
        more = f" and {len(fixed) - 4} more" if len(fixed) > 4 else ""
        raise ConfigError(f"{run_dir}: this run was started with other values of {shown}{more}; "
                          f"choose another run.name, or pass {ALLOW_CONFIG_CHANGE}")
    return changed


def starts(run_dir: Path) -> list[dict]:
    path = run_dir / STARTS
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash
    return out


def append(run_dir: Path, record: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / STARTS, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def check_not_looping(run_dir: Path, start_step: int) -> None:
    """ConfigError when the last MAX_SAME_STEP_FAILURES starts all began at `start_step` and failed."""
    records = starts(run_dir)
    begun = [r for r in records if r.get("event") == "start"]
    ends = {r.get("start"): r for r in records if r.get("event") == "end"}
    streak = 0
    for r in reversed(begun):
        end = ends.get(r.get("restart"))
        if r.get("step") != start_step or (end is not None and end.get("exit") in (0, 75)):
            break
        streak += 1
    if streak >= MAX_SAME_STEP_FAILURES:
        raise ConfigError(f"{run_dir}: the last {streak} starts all began at step {start_step} and failed before "
                          f"the next checkpoint; not starting again (see {run_dir / STARTS} and the logs; "
                          f"MOEFORGE_MAX_SAME_STEP_FAILURES={MAX_SAME_STEP_FAILURES})")
