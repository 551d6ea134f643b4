"""The trainer's command-line flags that are not overrides: `--help`, `--cfg job [--resolve]`
and `-m/--multirun`, as a Hydra app (`@hydra.main`) offers them. moeforge composes with Hydra's
compose API instead, so they are implemented here; `handle` returns an exit code when a flag
did the work, or None when the command line is an ordinary training run.

A sweep (`-m optim.lr=1e-3,3e-3 trainer.max_steps=2`) expands its comma lists (and `range()`,
`choice()`, `glob()`) with Hydra's own override parser, checks every combination's config before
the first job starts, then runs one job after another, each the ordinary single run
(`python -m train <its overrides> hydra.run.dir=<sweep dir>/<job number>`) in its own process.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from data.errors import EXIT_USER_ERROR, UserError

USAGE = """\
usage: python -m train [group=option ...] [group.key=value ...] [+experiment=NAME] [hydra.run.dir=DIR]
       python -m train [overrides] --cfg job [--resolve]   print the composed config and exit
       python -m train -m key=a,b [key2=c,d ...] [hydra.sweep.dir=DIR]   one run per combination
       python -m train --help                              this text (with overrides: their values)
       torchrun --nproc_per_node N -m train [overrides]"""

SWEEP_DIR = "multirun/%Y-%m-%d/%H-%M-%S"  # Hydra's default hydra.sweep.dir
SCHEMA_ONLY = "no files: set its keys"


class CliError(UserError):
    """A command-line flag used wrongly (one line, exit code 2)."""


def handle(argv: list[str], doc: str = "") -> int | None:
    """Act on --help, --cfg and -m; None: nothing to do here, train as usual."""
    try:
        flags, overrides = _split_flags(argv)
        if flags["help"]:
            print(help_text(overrides, doc))
            return 0
        if flags["multirun"]:
            if flags["cfg"]:
                raise CliError("--cfg with -m: print one combination's config with --cfg job, without -m")
            return multirun(overrides)
        if flags["cfg"]:
            print(job_config(overrides, flags["resolve"]), end="")
            return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    return None


def _split_flags(argv: list[str]) -> tuple[dict, list[str]]:
    flags = {"help": False, "multirun": False, "cfg": None, "resolve": False}
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in ("-h", "--help"):
            flags["help"] = True
        elif arg in ("-m", "--multirun"):
            flags["multirun"] = True
        elif arg == "--resolve":
            flags["resolve"] = True
        elif arg in ("-c", "--cfg") or arg.startswith("--cfg="):
            value = arg.split("=", 1)[1] if "=" in arg else next(args, "")
            if value != "job":
                raise CliError(f"--cfg {value or '(missing)'}: moeforge prints the job config only: --cfg job")
            flags["cfg"] = value
        elif arg.startswith("-"):
            raise CliError(f"{arg}: unknown option; options: --help, --cfg job [--resolve], -m (see --help)")
        else:
            rest.append(arg)
    if flags["resolve"] and not flags["cfg"] and not flags["help"]:
        raise CliError("--resolve: only with --cfg job")
    return flags, rest


def _config_overrides(overrides: list[str]) -> list[str]:
    """The overrides that change the config: `hydra.*` keys choose directories, not settings, and
    `+run.allow_config_change=true` is a launch flag (train/__main__.py takes both out)."""
    from .run import ALLOW_CONFIG_CHANGE

    return [o for o in overrides if not o.lstrip("+~").startswith("hydra.") and o != ALLOW_CONFIG_CHANGE]


def _compose(overrides: list[str]):
    """The composed config a run with these overrides writes to its config.yaml."""
    from . import run
    from .config import compose

    composed = compose(_config_overrides(overrides))
    if not composed.run.name:
        composed.run.name = run.default_name(overrides)
    return composed


# ---------------------------------------------------------------------------- --cfg job
def job_config(overrides: list[str], resolve: bool = False) -> str:
    """The composed config as YAML (`--cfg job`), validated like a run's; nothing is created."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .config import ConfigError, format_config_error, to_config

    composed = _compose(overrides)
    to_config(composed)
    try:
        return OmegaConf.to_yaml(composed, resolve=resolve)
    except OmegaConfBaseException as exc:  # an interpolation that does not resolve
        raise ConfigError(format_config_error(exc)) from None


# ---------------------------------------------------------------------------- --help
def _groups() -> dict[str, list[str]]:
    """Config group → its options (the YAML files under conf/<group>/)."""
    from .config import CONF_DIR

    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(CONF_DIR.iterdir()) if d.is_dir()}


def _default_options() -> dict[str, str]:
    from omegaconf import OmegaConf

    from .config import CONF_DIR

    out = {}
    for entry in OmegaConf.load(CONF_DIR / "config.yaml").get("defaults", []):
        if not isinstance(entry, str):
            out.update({str(k): str(v) for k, v in entry.items()})
    return out


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _leaves(node: dict, prefix: str) -> list[str]:
    out = []
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={_show(value)}")
    return out


def help_text(overrides: list[str], doc: str = "") -> str:
    """Usage, config groups and their options, every key with its value (defaults, or as overridden)."""
    from dataclasses import fields

    from omegaconf import OmegaConf

    from .config import Config

    groups, defaults = _groups(), _default_options()
    values = OmegaConf.to_container(_compose(overrides), enum_to_str=True)
    schema_groups = [f.name for f in fields(Config)]
    lines = [USAGE, ""]
    if doc:
        lines += [doc.strip(), ""]
    lines.append("== Config groups == (group=option picks conf/<group>/<option>.yaml)")
    width = max(len(g) for g in [*groups, *schema_groups])
    for group, options in groups.items():
        if group in defaults:
            note = f"(default: {defaults[group]})"
        else:
            note = f"(+{group}=NAME; none by default)"
        lines.append(f"  {group + ':':<{width + 1}} {', '.join(options)} {note}")
    for group in schema_groups:
        if group not in groups:
            lines.append(f"  {group + ':':<{width + 1}} {SCHEMA_ONLY}")
    lines += ["", "== Keys == (group.key=value; the values these overrides give; meaning: docs/config.md)"]
    for group in schema_groups:
        tokens = _leaves(values.get(group) or {}, f"{group}.") or [f"{group}={{}}"]
        lines.append(textwrap.fill("  ".join(tokens), width=100, initial_indent="  ", subsequent_indent="    ",
                                   break_long_words=False, break_on_hyphens=False))
    lines += ["  hydra.run.dir=DIR (the run directory)",
              f"  hydra.sweep.dir=DIR (with -m: job n runs in DIR/n; default {SWEEP_DIR})"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- -m / --multirun
def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Every combination of the sweep overrides (Hydra's grammar; the last one varies fastest)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from .config import CONF_DIR, ConfigError

    choices: list[list[str]] = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):  # glob() lists a group's files
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().hydra.config_loader)
        for arg in overrides:
            try:
                (override,) = parser.parse_overrides([arg])
                if not override.is_sweep_override():
                    choices.append([arg])
                elif not override.is_discrete_sweep():
                    raise ConfigError(f"{arg}: not a list of values to run (interval() needs a sweeper plugin)")
                else:
                    key = override.get_key_element()
                    choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
            except HydraException as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ConfigError(f"{arg}: {first}") from None
    return [list(combo) for combo in itertools.product(*choices)]


def _sweep_dir(overrides: list[str]) -> tuple[list[str], Path]:
    rest, sweep_dir = [], None
    for arg in overrides:
        if arg.startswith("hydra.sweep.dir="):
            sweep_dir = arg.split("=", 1)[1]
        elif arg.startswith("hydra.run.dir="):
            raise CliError(f"{arg}: with -m each job's run directory is <hydra.sweep.dir>/<job number>; "
                           "set hydra.sweep.dir")
        else:
            rest.append(arg)
    from .run import resolve_run_dir

    return rest, resolve_run_dir(sweep_dir or time.strftime(SWEEP_DIR), "")  # ${now:…} resolved once


def multirun(overrides: list[str]) -> int:
    """Run each combination as its own `python -m train` process, one after another.

    Every combination's config is checked first (a bad one starts nothing). A job that fails does
    not stop the sweep; the exit code is the first non-zero one. SIGTERM or SIGUSR1 (preemption)
    is passed on to the running job, which saves a checkpoint and exits 75, and no further job
    starts: the same command with the same hydra.sweep.dir continues the sweep (finished jobs
    return at once, the preempted one resumes).
    """
    from .config import to_config

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CliError("-m/--multirun: start a sweep with `python -m train -m …`, not under torchrun; "
                       "for multi-process jobs loop over torchrun in the shell (docs/config.md)")
    overrides, sweep_dir = _sweep_dir(overrides)
    jobs = expand_sweep(overrides)
    for job in jobs:
        try:
            to_config(_compose(job))
        except UserError as exc:
            raise CliError(f"{exc} (job {' '.join(job)})") from None
    swept = [i for i in range(len(jobs[0])) if len({job[i] for job in jobs}) > 1]

    def label(job: list[str]) -> str:  # the overrides that differ between jobs
        return " ".join(job[i] for i in swept) or "(one combination)"

    common = [arg for i, arg in enumerate(jobs[0]) if i not in swept]
    print(f"[multirun] {len(jobs)} job{'s' if len(jobs) != 1 else ''} in {sweep_dir}; each with "
          f"{' '.join(common) or 'no other overrides'}", flush=True)
    stop: list[int] = []
    child: list[subprocess.Popen] = []

    def forward(signum, _frame):
        stop.append(signum)
        if signum != signal.SIGINT and child and child[0].poll() is None:  # a terminal's ^C reaches it already
            child[0].send_signal(signum)

    signals = [s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None]
    previous = {s: signal.signal(s, forward) for s in signals}
    results: list[tuple[int, list[str], int]] = []
    try:
        for n, job in enumerate(jobs):
            if stop:
                break
            run_dir = sweep_dir / str(n)
            print(f"[multirun] #{n}: {label(job)} -> {run_dir}", flush=True)
            child[:] = [subprocess.Popen([sys.executable, "-m", "train", *job, f"hydra.run.dir={run_dir}"])]
            for signum in {s for s in stop if s != signal.SIGINT}:  # arrived while the job was starting
                child[0].send_signal(signum)
            code = child[0].wait()
            results.append((n, job, code))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    failed = [r for r in results if r[2] != 0]
    print(f"[multirun] {len(results)} of {len(jobs)} jobs ran, {len(failed)} failed; runs in {sweep_dir}", flush=True)
    for n, job, code in results:
        print(f"[multirun]   #{n} exit {code}: {label(job)}")
    if stop and len(results) < len(jobs):
        print(f"[multirun] stopped by signal {stop[0]}; the same command with hydra.sweep.dir={sweep_dir} "
              "continues the sweep", file=sys.stderr)
    code = next((r[2] for r in results if r[2] != 0), 0)
    if stop and code == 0 and len(results) < len(jobs):
        code = 128 + stop[0]
    return code if code >= 0 else 128 - code  # a job killed by signal k: 128 + k, as a shell reports it
