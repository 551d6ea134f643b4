"""One GPU check: everything that needs a GPU, in one command, into one results file (docs/gpu.md).

Runs, each in its own process with its own time limit, recording its command, exit code,
duration and key figures, and going on to the next step whatever happened:

  env              torch, CUDA, the GPU, versions of the packages the steps use, TE, nvcc
  pytest_gpu       pytest -m gpu (the tests that need a CUDA device)
  smoke_bf16       python -m train +experiment=smoke on the GPU in bf16
  smoke_fp8_torch  the same with fp8=torch (torch._scaled_mm)
  smoke_fp8_te     the same with fp8=te, when `import transformer_engine.pytorch` works (else skipped)
  fp8_gemm         bench/fp8_gemm.py --quick (FP8 GEMMs against BF16)
  model_step       bench/model_step.py --device cuda (one training step against transformers)

and writes <out>/gpu_check.md: a table of the steps, then per step the command, the figures
(final losses, tokens/s, memory, the benchmark tables) and, for a step that did not pass, the
end of its output. Full logs and run directories stay in --work. Exit code 0 when every step
passed or was skipped for a stated reason, 1 otherwise. The whole check stops starting steps
at --time-limit (default 450 s): a step cut short by it counts as failed.

Needs only the standard library itself; its steps need torch, and the trainer's packages
(DeepSpeed, Hydra, omegaconf), which launch/gpu_check.sh installs from carried wheels.

    launch/gpu_check.sh --out results/            # on the GPU machine
    python bench/gpu_check.py --dry-run           # the steps and their commands; runs nothing
    python bench/gpu_check.py --steps env smoke_bf16 --out results/
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = "gpu_check.md"
TAIL_LINES = 60       # output lines kept in the results file for a step that did not pass
MIN_STEP_S = 15       # a step is not started with less than this left of the time limit

# Printed as `key: value` lines by the env step. Runs in the child so that a broken torch or
# CUDA install is recorded as that step's failure, not a crash of the check.
ENV_SCRIPT = r"""
import importlib.metadata as md, os, platform, shutil, subprocess, sys, sysconfig
import torch
def show(k, v):
    print(f"{k}: {v}", flush=True)
def cmd_line(argv, pick):
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"n/a ({type(exc).__name__})"
    lines = [l.strip() for l in out.splitlines() if pick(l)]
    return lines[-1] if lines else "n/a"
show("python", platform.python_version())
show("torch", torch.__version__)
show("cuda", torch.version.cuda)
cuda = torch.cuda.is_available()
show("cuda_available", cuda)
if cuda:
    p = torch.cuda.get_device_properties(0)
    show("gpu", p.name)
    show("gpu_count", torch.cuda.device_count())
    show("capability", f"{p.major}.{p.minor}")
    show("gpu_memory_gib", f"{p.total_memory / 2**30:.1f}")
    show("multiprocessors", p.multi_processor_count)
if shutil.which("nvidia-smi"):
    show("driver", cmd_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], str.strip))
# DeepSpeed compiles its fused Adam on the GPU at first use: it needs nvcc and Python's headers.
nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
show("nvcc", cmd_line([nvcc, "--version"], lambda l: "release" in l))
show("python_h", os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))
for name in ("triton", "deepspeed", "hydra-core", "omegaconf", "pydantic", "typing-extensions", "numpy",
             "transformers", "pytest", "transformer-engine"):
    try:
        show(name, md.version(name))
    except md.PackageNotFoundError:
        show(name, "absent")
try:
    import transformer_engine.pytorch  # noqa: F401
    show("te_import", "ok")
except Exception as exc:  # ImportError, or a TE build that does not match this torch
    show("te_import", f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}")
if cuda:
    sys.path.insert(0, os.getcwd())
    from model.fp8 import torch_fp8_gemm_works
    show("torch_fp8_gemm", torch_fp8_gemm_works(torch.device("cuda")))
else:
    print("error: no CUDA device visible to torch", file=sys.stderr)
sys.exit(0 if cuda else 1)
"""

TE_PROBE = "import transformer_engine.pytorch"


@dataclass
class Step:
    """One command of the check. `requires`: Python code that must run without error, else the
    step is skipped (not failed) with the error's last line as the reason. `parse(output, step)`
    returns the step's figures."""

    name: str
    argv: list[str]
    timeout: float
    what: str
    parse: Callable[[str, "Step"], dict] | None = None
    requires: str | None = None
    run_dir: Path | None = None   # removed before the step: a smoke run must not resume an old one
    extra: dict = field(default_factory=dict)


@dataclass
class Result:
    name: str
    what: str
    command: str
    status: str          # pass | fail | timeout | skipped | not run
    exit_code: int | None
    seconds: float
    figures: dict
    reason: str = ""
    tail: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("pass", "skipped")


# --- parsers ------------------------------------------------------------------------------------

def parse_env(out: str, step: Step) -> dict:
    figures = {}
    for line in out.splitlines():
        key, sep, value = line.partition(": ")
        if sep and re.fullmatch(r"[a-z0-9_-]+", key):
            figures[key] = value.strip()
    return figures


def parse_pytest(out: str, step: Step) -> dict:
    """Counts from pytest's last summary line (`2 passed, 3 skipped, 512 deselected in 9.1s`)."""
    for line in reversed(out.splitlines()):
        if re.search(r"\bin [\d.]+s\b", line) and re.search(r"\d+ (passed|failed|skipped|error|deselected)", line):
            figures = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|"
                                                        r"xfailed|xpassed)", line)}
            skips = [l.split("SKIPPED", 1)[1].strip() for l in out.splitlines() if l.startswith("SKIPPED")]
            if skips:
                figures["skip_reasons"] = skips
            return figures
    return {}


def parse_smoke(out: str, step: Step) -> dict:
    """The trainer's summary block, plus first/last loss, memory and MFU from metrics.jsonl."""
    figures: dict = {}
    patterns = {"final_train_loss": r"final train loss\s+([\d.]+)", "final_val_loss": r"final val loss\s+([\d.]+)",
                "tokens_per_s": r"throughput\s+([\d,]+) tokens/s", "elapsed_s": r"elapsed\s+([\d.]+) s"}
    for key, pat in patterns.items():
        m = re.search(pat, out)
        if m:
            figures[key] = float(m.group(1).replace(",", ""))
    metrics = step.run_dir / "metrics.jsonl" if step.run_dir else None
    if metrics and metrics.is_file():
        rows = []
        for line in metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a run killed mid-line
                pass
        train = [r for r in rows if r.get("kind") == "train"]
        if train:
            figures["steps"] = train[-1].get("step")
            figures["first_loss"] = train[0].get("loss")
            figures["last_logged_loss"] = train[-1].get("loss")
            for key in ("mem_peak_gib", "mfu", "tflops_per_device", "skipped_updates"):
                if train[-1].get(key) is not None:
                    figures[key] = train[-1][key]
    return figures


def parse_fp8_gemm(out: str, step: Step) -> dict:
    """The header lines and the markdown table as printed (rows appear as they are timed, so a
    run cut short still leaves the rows it finished)."""
    keep = [l for l in out.splitlines() if l.startswith(("device ", "backends:", "|"))]
    return {"table": "\n".join(keep)} if keep else {}


def parse_model_step(out: str, step: Step) -> dict:
    path = step.extra.get("json")
    if path and Path(path).is_file():
        rows = json.loads(Path(path).read_text())
        keys = ("config", "device", "tokens_per_step", "ours_tok_s", "hf_tok_s", "ratio", "ours_peak_mib",
                "hf_peak_mib", "hf_experts")
        return {"rows": [{k: r[k] for k in keys if k in r} for r in rows]}
    return {}


# --- the steps ----------------------------------------------------------------------------------

def default_steps(python: str, work: Path) -> list[Step]:
    smoke = [python, "-m", "train", "+experiment=smoke", "trainer.device=cuda", "trainer.dtype=bf16",
             # wandb is not on the GPU image; the progress bar would only clutter the log
             "logging.wandb.mode=disabled", "logging.progress_bar=false"]

    def smoke_step(name: str, what: str, extra: list[str], timeout: float, requires: str | None = None) -> Step:
        run_dir = work / name
        return Step(name, [*smoke, *extra, f"hydra.run.dir={run_dir}"], timeout, what, parse_smoke, requires, run_dir)

    model_json = work / "model_step.json"
    return [
        Step("env", [python, "-c", ENV_SCRIPT], 60, "torch, CUDA, GPU and package versions", parse_env),
        Step("pytest_gpu", [python, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                            "--continue-on-collection-errors", "tests"], 120, "tests marked gpu", parse_pytest),
        # The first smoke run also prepares the stdlib corpus (cached) and compiles DeepSpeed's fused Adam.
        smoke_step("smoke_bf16", "smoke run, bf16", [], 210),
        smoke_step("smoke_fp8_torch", "smoke run, bf16 + fp8=torch", ["fp8=torch"], 120),
        smoke_step("smoke_fp8_te", "smoke run, bf16 + fp8=te", ["fp8=te"], 120, requires=TE_PROBE),
        Step("fp8_gemm", [python, "bench/fp8_gemm.py", "--quick"], 150, "FP8 GEMMs vs BF16 (bench/fp8_gemm.py)",
             parse_fp8_gemm),
        Step("model_step", [python, "bench/model_step.py", "--device", "cuda", "--json", str(model_json)], 120,
             "training step vs transformers (bench/model_step.py)", parse_model_step,
             extra={"json": str(model_json)}),
    ]


# --- running ------------------------------------------------------------------------------------

def _tail(text: str, n: int = TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-n:])


def _command(step: Step) -> str:
    argv = ["python", "-c", "<env script>"] if step.name == "env" else step.argv
    return shlex.join(argv)


def _run(argv: list[str], timeout: float, log: Path, env: dict) -> tuple[int | None, str, bool]:
    """(exit code, output, timed out). The child gets its own process group so that a timeout
    ends it and everything it started (data readers, compiler workers)."""
    with open(log, "w") as f:
        try:
            proc = subprocess.Popen(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        except OSError as exc:  # no such interpreter: that step's failure, not the check's
            f.write(f"cannot start {argv[0]}: {exc}\n")
            return 127, log.read_text(errors="replace"), False
        try:
            code, timed_out = proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended just now
                pass
            proc.wait()
            code, timed_out = None, True
    return code, log.read_text(errors="replace"), timed_out


def run_steps(steps: list[Step], work: Path, time_limit: float, echo=print,
              min_step_s: float = MIN_STEP_S) -> list[Result]:
    """Run each step in turn, whatever the earlier ones did; full output to <work>/logs/<step>.log."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.monotonic()
    results = []
    for step in steps:
        left = time_limit - (time.monotonic() - start)
        cmd = _command(step)
        if left < min_step_s:
            results.append(Result(step.name, step.what, cmd, "not run", None, 0.0, {},
                                  f"the check's time limit ({time_limit:.0f} s) was reached"))
            echo(f"[{step.name}] not run: time limit reached")
            continue
        t0 = time.monotonic()
        if step.requires:
            probe_log = logs / f"{step.name}.probe.log"
            code, out, _ = _run([step.argv[0], "-c", step.requires], min(60, left), probe_log, env)
            if code != 0:
                reason = f"`{step.requires}` failed: {(out.strip().splitlines() or ['no output'])[-1]}"
                results.append(Result(step.name, step.what, cmd, "skipped", None, time.monotonic() - t0, {}, reason))
                echo(f"[{step.name}] skipped: {reason}")
                continue
        if step.run_dir is not None:
            shutil.rmtree(step.run_dir, ignore_errors=True)
        timeout = min(step.timeout, time_limit - (time.monotonic() - start))
        echo(f"[{step.name}] {cmd if len(cmd) < 200 else cmd[:200] + ' …'}")
        code, out, timed_out = _run(step.argv, timeout, logs / f"{step.name}.log", env)
        seconds = time.monotonic() - t0
        try:
            figures = step.parse(out, step) if step.parse else {}
        except Exception as exc:  # a parser must never lose the step's result
            figures = {"parse_error": f"{type(exc).__name__}: {exc}"}
        if timed_out:
            status, reason = "timeout", f"stopped after {timeout:.0f} s"
        else:
            status, reason = ("pass", "") if code == 0 else ("fail", f"exit code {code}")
        results.append(Result(step.name, step.what, cmd, status, code, seconds, figures, reason,
                              "" if status == "pass" else _tail(out)))
        echo(f"[{step.name}] {status} in {seconds:.1f} s" + (f": {reason}" if reason else ""))
    return results


# --- the results file ---------------------------------------------------------------------------

def _short(figures: dict) -> str:
    """A one-cell summary of a step's figures for the table."""
    keys = ("gpu", "torch", "cuda", "passed", "failed", "skipped", "final_train_loss", "final_val_loss",
            "tokens_per_s", "mem_peak_gib")
    parts = []
    for k in keys:
        if k in figures:
            v = figures[k]
            parts.append(f"{k} {v:,.0f}" if k == "tokens_per_s" and isinstance(v, float) else f"{k} {v}")
    for row in figures.get("rows", []):
        if isinstance(row.get("ratio"), (int, float)):
            parts.append(f"{row.get('config')}: moeforge/transformers tok/s {row['ratio']:.2f}")
    if figures.get("table"):
        parts.append(f"{figures['table'].count(chr(10)) - 3} table rows, below")
    return ", ".join(parts).replace("|", "/")


def render(results: list[Result], started: str, work: Path) -> str:
    passed = sum(r.status == "pass" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    ok = all(r.ok for r in results)
    env = next((r.figures for r in results if r.name == "env"), {})
    lines = [f"# moeforge GPU check, {started}", ""]
    if env:
        lines.append(f"{env.get('gpu', 'no GPU')}, torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, "
                     f"Python {env.get('python', '?')}, driver {env.get('driver', '?')}")
        lines.append("")
    lines.append(f"**{'PASSED' if ok else 'FAILED'}**: {passed} of {len(results)} steps passed"
                 + (f", {skipped} skipped" if skipped else "")
                 + f"; {sum(r.seconds for r in results):.0f} s in all. Logs and run directories: {work}")
    lines += ["", "| step | result | exit | seconds | figures |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.status} | {'' if r.exit_code is None else r.exit_code} | {r.seconds:.1f} | "
                     f"{_short(r.figures)} |")
    for r in results:
        lines += ["", f"## {r.name}: {r.status}", "", r.what + (f"; {r.reason}" if r.reason else ""), "",
                  f"    {r.command}", ""]
        figures = dict(r.figures)
        table = figures.pop("table", None)
        for k, v in figures.items():
            lines.append(f"- {k}: {json.dumps(v) if isinstance(v, (list, dict)) else v}")
        if table:
            lines += ["", table]
        if r.tail:
            lines += ["", "Output (last lines):", "", "```", r.tail, "```"]
    payload = {"started": started, "passed": ok, "steps": [r.__dict__ | {"tail": None} for r in results]}
    lines += ["", "## Machine-readable", "", "```json", json.dumps(payload, indent=1, default=str), "```", ""]
    return "\n".join(lines)


def run_check(steps: list[Step], out: Path, work: Path, time_limit: float, echo=print,
              min_step_s: float = MIN_STEP_S) -> int:
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results = run_steps(steps, work, time_limit, echo, min_step_s)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).write_text(render(results, started, work))
    ok = all(r.ok for r in results)
    echo(f"{'passed' if ok else 'FAILED'}: {out / RESULTS}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_check", help="where gpu_check.md goes")
    ap.add_argument("--work", type=Path, default=None, help="logs and run directories (default: a new temp dir)")
    ap.add_argument("--time-limit", type=float, default=450, help="no step starts after this many seconds")
    ap.add_argument("--steps", nargs="+", metavar="NAME", help="run only these steps (default: all)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter the steps run with")
    ap.add_argument("--dry-run", action="store_true", help="print the steps and their commands, run nothing")
    args = ap.parse_args(argv)
    # A fresh folder per check by default: the smoke runs resume from checkpoints in their run
    # directory, so an old one would turn a 200-step run into a 0-step one (they are removed too).
    work = args.work or Path(tempfile.gettempdir()) / f"moeforge-gpu-check-{time.strftime('%Y%m%d-%H%M%S')}"
    steps = default_steps(args.python, work)
    if args.steps:
        unknown = sorted(set(args.steps) - {s.name for s in steps})
        if unknown:
            print(f"error: --steps {' '.join(unknown)}: unknown (steps: {', '.join(s.name for s in steps)})",
                  file=sys.stderr)
            return 2
        steps = [s for s in steps if s.name in args.steps]
    if args.dry_run:
        for s in steps:
            cond = f"  [only if `{s.requires}` works]" if s.requires else ""
            print(f"{s.name:<16}{s.timeout:>5.0f} s  {s.what}{cond}\n    {_command(s)}")
        print(f"time limit {args.time_limit:.0f} s; results: {args.out / RESULTS}")
        return 0
    return run_check(steps, args.out, work, args.time_limit)


if __name__ == "__main__":
    sys.exit(main())
