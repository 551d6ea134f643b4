"""`python -m train.report <run_dir>`: PNG plots of a run from its metrics.jsonl.

Writes run_dir/plots/{loss,lr,throughput,expert_load}.png (1200×800 px). The expert-load
figure is a heatmap per MoE layer, time on x and expert on y, colour = load / mean load
(1 = balanced), from the `expert_load` matrix of each logged step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SIZE, DPI = (12, 8), 100


class ReportError(ValueError):
    pass


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise ReportError(f"{path}: missing (not a moeforge run directory?)")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            raise ReportError(f"{path}:{n}: not valid JSON") from None
    if not any(r.get("kind") == "train" for r in records):
        raise ReportError(f"{path}: no training records")
    return records


def render(run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    out = Path(run_dir) / "plots"
    out.mkdir(exist_ok=True)

    def series(rows, key):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        return ([p[0] for p in pts], [p[1] for p in pts])

    figs = {}
    fig, ax = plt.subplots(figsize=SIZE, dpi=DPI)
    ax.plot(*series(train, "loss"), label="train loss")
    if any(r.get("mtp_loss") for r in train):
        ax.plot(*series(train, "mtp_loss"), label="MTP loss", alpha=0.7)
    if evals:
        ax.plot(*series(evals, "val_loss"), "o-", label="validation loss")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="Loss")
    ax.legend()
    figs["loss.png"] = fig

    fig, ax = plt.subplots(figsize=SIZE, dpi=DPI)
    ax.plot(*series(train, "lr"))
    ax.set(xlabel="step", ylabel="learning rate", title="Learning rate")
    figs["lr.png"] = fig

    fig, ax = plt.subplots(figsize=SIZE, dpi=DPI)
    ax.plot(*series(train, "tokens_per_s"), color="tab:blue")
    ax.set(xlabel="step", ylabel="tokens/s", title="Throughput and MFU")
    steps, mfu = series(train, "mfu")
    if mfu:
        ax2 = ax.twinx()
        ax2.plot(steps, [100 * m for m in mfu], color="tab:orange")
        ax2.set_ylabel("MFU (%)")
    figs["throughput.png"] = fig

    loads = [(r["step"], np.asarray(r["expert_load"])) for r in train if r.get("expert_load")]
    if loads:
        steps = [s for s, _ in loads]
        cube = np.stack([m for _, m in loads])  # (time, layer, expert)
        n_layers = cube.shape[1]
        fig, axes = plt.subplots(n_layers, 1, figsize=SIZE, dpi=DPI, squeeze=False, sharex=True)
        for i in range(n_layers):
            im = axes[i, 0].imshow(cube[:, i, :].T, aspect="auto", origin="lower", cmap="viridis",
                                   extent=(steps[0], steps[-1], -0.5, cube.shape[2] - 0.5))
            axes[i, 0].set_ylabel(f"MoE {i}\nexpert")
        axes[-1, 0].set_xlabel("step")
        fig.colorbar(im, ax=axes[:, 0].tolist(), label="load / mean load")
        fig.suptitle("Expert load per MoE layer over time")
        figs["expert_load.png"] = fig

    written = []
    for name, fig in figs.items():
        fig.savefig(out / name, dpi=DPI)
        plt.close(fig)
        written.append(out / name)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m train.report <run_dir>", file=sys.stderr if len(argv) != 1 else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        for path in render(Path(argv[0])):
            print(path)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
