"""`python -m train.report <run_dir>`: PNG plots of a run from its metrics.jsonl.

Writes into run_dir/plots/, each 1200×800 px (12×8 in at dpi 100, no tight bounding box, so
the size is fixed), and prints the paths written:
  loss.png         train loss, MTP loss (when logged) and validation loss (eval records) vs step
  lr.png           learning rate vs step
  throughput.png   tokens/s (all ranks) and, on a second axis, MFU % when it is not null
  expert_load.png  only for MoE runs, from each train record's "expert_load" matrix
                   (n_moe_layers × n_experts, load / layer mean), in two panels:
                   top: max/mean load per MoE layer over time (layer × step heatmap);
                   bottom: load/mean of every expert at the last logged step (layer × expert).
The expert-load layout is chosen to scale: one (time × expert) panel per layer is readable
for the smoke model's 2 layers but not for DeepSeek-V3's 58 MoE layers × 256 experts; max/mean
over time shows where and when balance breaks (it bounds an expert-parallel step), and the
last matrix shows which experts are hot or dead. Time is subsampled to ≤ 1000 columns.

Matplotlib's object API (`Figure`, rendered by Agg) is used, not pyplot: no global backend or
figure state, so the trainer can call `render` in-process. Plots are drawn into a temporary
folder and moved into plots/ only when all succeeded: a failure leaves no partial plots.

Bad input (no directory, no metrics.jsonl, an empty file, a line that is not a JSON object
with an integer "step" and a "kind" of train/eval, a non-numeric plotted value, expert_load
matrices of changing shape) ends with one line `error: <file>[:line]: …` on stderr and exit
code 2; a plots/ folder that cannot be written, exit code 1. A last line without its newline
(the run was killed mid-write) is skipped with a warning: the plots of a crashed run are
exactly the ones one wants. Steps logged again by a run resumed from an earlier checkpoint
replace the earlier lines.

In-process, `render` of a run that logged no training record returns no plots instead: the
trainer's summary of a run started again at its last step (trainer.max_steps already reached)
has nothing to plot, and that is not an error.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from data.errors import EXIT_USER_ERROR, UserError

FIGSIZE, DPI = (12, 8), 100  # 1200×800 px
KINDS = ("train", "eval")
NUMERIC = ("loss", "mtp_loss", "val_loss", "lr", "tokens_per_s", "mfu")
MAX_COLUMNS = 1000


class ReportError(UserError):
    """Bad input: the message is one line naming the file (and line)."""


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check(rec, where: str) -> None:
    if not isinstance(rec, dict):
        raise ReportError(f"{where}: expected a JSON object")
    step = rec.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ReportError(f"{where}: 'step' missing or not a non-negative integer")
    if rec.get("kind") not in KINDS:
        raise ReportError(f"{where}: 'kind' is {rec.get('kind')!r}, expected train or eval")
    for key in NUMERIC:
        if rec.get(key) is not None and not _is_number(rec[key]):
            raise ReportError(f"{where}: '{key}' is not a number")


def read_metrics(run_dir: Path, require_train: bool = True) -> list[dict]:
    """The records of run_dir/metrics.jsonl, validated; ReportError on bad input, and (with
    `require_train`) when there is no training record.

    Streamed line by line, and each "expert_load" matrix is reduced while reading to its
    per-layer maximum ("_layer_max"), the full matrix kept only on the last record that has
    one: at DeepSeek-V3's 58 × 256 a run of 10k log lines would otherwise need gigabytes.
    """
    import numpy as np

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise ReportError(f"{path}: missing (not a moeforge run directory?)")
    records, shape, shape_line, last_load = [], None, 0, None
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    if not line.endswith("\n"):  # the last line, cut short by a crash mid-write
                        print(f"warning: {path}:{n}: skipping a truncated last line", file=sys.stderr)
                        continue
                    raise ReportError(f"{path}:{n}: not valid JSON") from None
                _check(rec, f"{path}:{n}")
                if rec.get("expert_load") is not None:
                    try:
                        load = np.asarray(rec["expert_load"], dtype=np.float32)  # (layer, expert)
                    except (TypeError, ValueError):
                        load = None
                    if load is None or load.ndim != 2 or load.size == 0:
                        raise ReportError(f"{path}:{n}: 'expert_load' is not a non-empty numeric matrix")
                    if shape is not None and load.shape != shape:
                        raise ReportError(f"{path}:{n}: expert_load is {load.shape[0]}×{load.shape[1]}, but "
                                          f"{shape[0]}×{shape[1]} on line {shape_line}")
                    shape, shape_line = load.shape, n
                    rec["_layer_max"] = load.max(axis=1)
                    rec["expert_load"] = load
                    if last_load is not None:
                        del last_load["expert_load"]
                    last_load = rec
                records.append(rec)
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: unreadable ({exc})") from None
    if require_train and not any(r["kind"] == "train" for r in records):
        raise ReportError(f"{path}: no training records")
    return records


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _figure():
    from matplotlib.figure import Figure

    return Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} logged", ha="center", va="center", transform=ax.transAxes, color="gray")


def plot_loss(train: list[dict], evals: list[dict]):
    fig = _figure()
    ax = fig.add_subplot()
    drawn = False
    for rows, key, label, style in ((train, "loss", "train loss", "-"), (train, "mtp_loss", "MTP loss", "-"),
                                    (evals, "val_loss", "validation loss", "o-")):
        steps, values = _series(rows, key)
        if values:
            ax.plot(steps, values, style, label=label, alpha=0.8 if key == "mtp_loss" else 1.0)
            drawn = True
    if drawn:
        ax.legend()
    else:
        _no_data(ax, "loss")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="Loss")
    ax.grid(alpha=0.3)
    return fig


def plot_lr(train: list[dict], evals: list[dict]):
    fig = _figure()
    ax = fig.add_subplot()
    steps, lr = _series(train, "lr")
    if lr:
        ax.plot(steps, lr)
    else:
        _no_data(ax, "learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.set(xlabel="step", ylabel="learning rate", title="Learning rate")
    ax.grid(alpha=0.3)
    return fig


def plot_throughput(train: list[dict], evals: list[dict]):
    fig = _figure()
    ax = fig.add_subplot()
    steps, tok = _series(train, "tokens_per_s")
    if tok:
        ax.plot(steps, tok, color="tab:blue", label="tokens/s")
    else:
        _no_data(ax, "throughput")
    ax.set(xlabel="step", title="Throughput and MFU")
    ax.set_ylabel("tokens/s (all ranks)", color="tab:blue")
    ax.set_ylim(bottom=0)  # from zero: a 2% wobble should look like one
    ax.grid(alpha=0.3)
    steps, mfu = _series(train, "mfu")
    if mfu:  # null on a CPU or an unknown device: no axis rather than a fake number
        ax2 = ax.twinx()
        ax2.plot(steps, [100 * m for m in mfu], color="tab:orange", linestyle="--", label="MFU")
        ax2.set_ylabel("MFU (%)", color="tab:orange")
        ax2.set_ylim(bottom=0)
        lines = ax.get_lines() + ax2.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], loc="lower right")
    return fig


def _edges(values):
    """Cell edges around sorted centres (for pcolormesh with irregular steps)."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    if len(v) == 1:
        return np.array([v[0] - 0.5, v[0] + 0.5])
    mid = (v[1:] + v[:-1]) / 2
    return np.concatenate([[2 * v[0] - mid[0]], mid, [2 * v[-1] - mid[-1]]])


def plot_expert_load(train: list[dict], evals: list[dict]):
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    rows = [r for r in train if r.get("_layer_max") is not None]
    if not rows:
        return None  # a dense model: no figure
    # The matrix is kept on the file's last record that has one (see read_metrics).
    last_row = next((r for r in reversed(rows) if "expert_load" in r), None)
    if len(rows) > MAX_COLUMNS:
        rows = [rows[i] for i in sorted(set(np.linspace(0, len(rows) - 1, MAX_COLUMNS).round().astype(int)))]
    steps = [r["step"] for r in rows]
    max_over_mean = np.stack([r["_layer_max"] for r in rows], axis=1)  # (layer, time)
    n_layers = max_over_mean.shape[0]
    layer_edges = np.arange(n_layers + 1) - 0.5

    fig = _figure()
    top, bottom = fig.subplots(2, 1)
    mesh = top.pcolormesh(_edges(steps), layer_edges, max_over_mean, cmap="viridis", vmin=1.0,
                          vmax=max(float(max_over_mean.max()), 1.01))
    fig.colorbar(mesh, ax=top, label="max / mean load")
    top.set(xlabel="step", ylabel="MoE layer", title="Busiest expert per MoE layer over time (1 = balanced)")

    if last_row is not None:
        last = last_row["expert_load"]  # (layer, expert)
        norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(last.max())))
        mesh = bottom.pcolormesh(np.arange(last.shape[1] + 1) - 0.5, layer_edges, last, cmap="RdBu_r", norm=norm)
        fig.colorbar(mesh, ax=bottom, label="load / mean load")
        bottom.set(title=f"Expert load at step {last_row['step']} (0 = dead expert)")
    else:  # its record was replaced by a resumed run's line without one
        _no_data(bottom, "expert-load matrix")
    bottom.set(xlabel="expert", ylabel="MoE layer")
    if n_layers <= 16:
        for ax in (top, bottom):
            ax.set_yticks(range(n_layers))
    return fig


PLOTS = (("loss.png", plot_loss), ("lr.png", plot_lr), ("throughput.png", plot_throughput),
         ("expert_load.png", plot_expert_load))


def _latest(rows: list[dict]) -> list[dict]:
    """Rows with increasing steps, later lines winning: a run resumed from an earlier
    checkpoint appends steps it had already logged, and those replace the old ones."""
    out: list[dict] = []
    for r in rows:
        while out and out[-1]["step"] >= r["step"]:
            out.pop()
        out.append(r)
    return out


def render(run_dir: Path, require_train: bool = False) -> list[Path]:
    """Write the plots of `run_dir` into run_dir/plots/ and return their paths.

    ReportError on bad input; nothing is left in plots/ from a failed render. A metrics.jsonl
    without training records (a run started at its last step logs none) gives [] and no
    plots/, or, with `require_train` (the command line), a ReportError."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir, require_train)
    train = _latest([r for r in records if r["kind"] == "train"])
    evals = _latest([r for r in records if r["kind"] == "eval"])
    if not train:
        return []
    tmp = Path(tempfile.mkdtemp(prefix=".plots-", dir=run_dir))
    try:
        names = []
        for name, draw in PLOTS:
            fig = draw(train, evals)
            if fig is not None:
                fig.savefig(tmp / name, dpi=DPI)
                names.append(name)
        out = run_dir / "plots"
        out.mkdir(exist_ok=True)
        for name in names:
            os.replace(tmp / name, out / name)
        return [out / name for name in names]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


USAGE = "usage: python -m train.report <run_dir>"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["-h"], ["--help"]):
        print(USAGE + "\n\n" + __doc__.split("\n\n")[1])
        return 0
    if len(argv) != 1:
        print(USAGE, file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        for path in render(Path(argv[0]), require_train=True):
            print(path)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:
        print(f"error: {Path(argv[0]) / 'plots'}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
