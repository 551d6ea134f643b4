"""FP8 training against the seed-to-seed band of full precision, with a negative control.

A single FP8-vs-fp32 pair cannot tell FP8 error from run-to-run noise: a small model's loss
after a few hundred steps moves by percents with the seed (initialisation and data order).
This runs, at the same settings, full precision at N seeds (the band; --band-seeds adds
fp32-only seeds), emulated blockwise FP8 at the same seeds (paired: same init, same data), and
a negative control that must fall outside the band — `fp8.recipe=amax_floor`, blockwise with
DeepSeek's inference amax floor (1e-4) on every operand, which flushes the small gradients of
a pretraining batch (the defect the FP8 path once had), its gradients quantised at the size
DeepSeek-V3's 63M-token batch gives them (model/fp8/gemm.py GRAD_SCALES) — and prints the final validation loss of each run (one fixed validation set for all seeds),
the band (fp32's mean ± 2 sd), and each run's distance from its fp32 partner in units of the
band's standard deviation. "other forward" is the same weights evaluated with the other
forward (full precision for FP8 runs, emulated FP8 for fp32 runs): it separates what FP8 did
to training from what an FP8 forward alone costs the loss. `--controls` adds DeepSeek-V3's divergent ablation (activation
gradients in 128×128 blocks, `grad_blocks`) and an E5M2 forward (`e5m2_forward`): at smoke
scale neither separates from the band (E4M3's range covers this model's gradients).

Runs are spread over --procs single-thread worker processes (tests/integration/
fp8_train_worker.py drives the real Trainer). Defaults: the smoke experiment's own settings.

    python bench/fp8_band.py --data DIR                      # +experiment=smoke, 300 steps, seeds 11 12 13
    python bench/fp8_band.py --data DIR --steps 300 --set trainer.seq_len=64 trainer.global_batch_size=4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "integration" / "fp8_train_worker.py"
QUIET = ["trainer.threads=1", "logging.wandb.mode=disabled", "logging.progress_bar=false",
         "trainer.log_interval=1000", "trainer.eval_interval=0"]
VARIANTS = {"fp32": ["fp8=off"], "fp8": ["fp8=emulated", "fp8.recipe=blockwise"],
            # negative controls (model/fp8/gemm.py RECIPES)
            "amax_floor": ["fp8=emulated", "fp8.recipe=amax_floor"],
            "e5m2_forward": ["fp8=emulated", "fp8.recipe=e5m2_forward"],
            "grad_blocks": ["fp8=emulated", "fp8.recipe=grad_blocks"]}
CONTROLS = ("amax_floor", "e5m2_forward", "grad_blocks")
BAND_SDS = 2.0  # the band: fp32's mean ± 2 standard deviations over the seeds


def run_band(data: Path, steps: int, seeds: list[int], settings: list[str], procs: int = 2,
             controls: tuple[str, ...] = ("amax_floor",), control_seeds: list[int] | None = None,
             timeout: int = 7200, env: dict | None = None, band_seeds: list[int] | None = None) -> dict:
    """{name: {"loss": [...], "val_loss": v, "seconds": s, ...}} for fp32 at `band_seeds` (default:
    `seeds`; fp32 runs cost half an FP8 run's, and the band's sd from three seeds alone can come
    out at a third of the truth), FP8 at `seeds` and each control at `control_seeds` (default:
    the first seed); names are "<variant>-<seed>"."""
    band_seeds = list(dict.fromkeys([*seeds, *(band_seeds or [])]))
    jobs = [(f"fp32-{s}", [*settings, *QUIET, *VARIANTS["fp32"], f"trainer.seed={s}"]) for s in band_seeds]
    jobs += [(f"fp8-{s}", [*settings, *QUIET, *VARIANTS["fp8"], f"trainer.seed={s}"]) for s in seeds]
    jobs += [(f"{c}-{s}", [*settings, *QUIET, *VARIANTS[c], f"trainer.seed={s}"])
             for c in controls for s in (control_seeds or seeds[:1])]
    # Longest first onto the least-loaded process (FP8 runs cost ~1.5–2× fp32's).
    cost = {name: (1 if name.startswith("fp32") else 2) for name, _ in jobs}
    shares: list[list] = [[] for _ in range(procs)]
    for job in sorted(jobs, key=lambda j: -cost[j[0]]):
        min(shares, key=lambda sh: sum(cost[n] for n, _ in sh)).append(job)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", **(env or {})}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        running = []
        for i, share in enumerate(s for s in shares if s):
            args = []
            for name, overrides in share:
                args += ["--", name, *overrides] if args else [name, *overrides]
            out, log = Path(tmp) / f"{i}.json", Path(tmp) / f"{i}.log"
            with open(log, "w") as f:  # files, not pipes: a full pipe would stall a worker
                running.append((out, log, subprocess.Popen(
                    [sys.executable, str(WORKER), str(out), str(data), str(steps), *args],
                    cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)))
        for out, log, p in running:
            p.wait(timeout=timeout)
            if p.returncode != 0:
                raise RuntimeError(f"worker failed:\n{log.read_text()[-3000:]}")
            results.update(json.loads(out.read_text()))
    return results


def _seeds(results: dict, variant: str) -> list[int]:
    return sorted(int(k.rsplit("-", 1)[1]) for k in results if k.rsplit("-", 1)[0] == variant)


def summarise(results: dict) -> dict:
    """The band of fp32's final validation losses (every fp32 seed run) and where FP8 (paired
    with fp32 at the same seeds) and the controls fall in it."""
    band_seeds, seeds = _seeds(results, "fp32"), _seeds(results, "fp8")
    ref = [results[f"fp32-{s}"]["val_loss"] for s in band_seeds]
    fp8 = [results[f"fp8-{s}"]["val_loss"] for s in seeds]
    sd = statistics.stdev(ref)
    controls = {k: v["val_loss"] for k, v in results.items() if k.rsplit("-", 1)[0] in CONTROLS}
    paired = [f - results[f"fp32-{s}"]["val_loss"] for f, s in zip(fp8, seeds)]
    mean = statistics.mean(ref)
    return {"fp32": ref, "fp8": fp8, "band_seeds": band_seeds, "seeds": seeds,
            "band": (mean - BAND_SDS * sd, mean + BAND_SDS * sd), "band_mean": mean, "band_sd": sd,
            "fp8_mean": statistics.mean(fp8), "paired_gaps": paired, "mean_paired_gap": statistics.mean(paired),
            "controls": controls,
            "control_gaps_sd": {k: (v - results[f"fp32-{k.rsplit('-', 1)[1]}"]["val_loss"]) / sd
                                for k, v in controls.items()}}


def table(results: dict) -> str:
    s = summarise(results)
    lines = ["| run | seed | final val loss | vs fp32 same seed | in band SDs | other forward | seconds |",
             "|---|---|---|---|---|---|---|"]
    for name, r in sorted(results.items(), key=lambda kv: (kv[0].split("-")[0] != "fp32", kv[0])):
        variant, seed = name.rsplit("-", 1)
        ref = results[f"fp32-{seed}"]["val_loss"]
        gap = r["val_loss"] - ref
        other = r.get("val_loss_hp", r.get("val_loss_fp8_forward"))
        lines.append(f"| {variant} | {seed} | {r['val_loss']:.4f} | {gap:+.4f} ({gap / ref:+.2%}) | "
                     f"{gap / s['band_sd']:+.2f} | {other:.4f} | {r['seconds']:.0f} |")
    lines.append(f"\nfp32 band over seeds {s['band_seeds']} (mean ± {BAND_SDS:g} sd): {s['band'][0]:.4f} – {s['band'][1]:.4f} "
                 f"(mean {s['band_mean']:.4f}, sd {s['band_sd']:.4f}); FP8 mean {s['fp8_mean']:.4f}, mean paired gap {s['mean_paired_gap']:+.4f} "
                 f"({s['mean_paired_gap'] / s['band_sd']:+.2f} sd)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a data.prepare output folder (the smoke corpus: input=stdlib tokenizer=byte)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13])
    ap.add_argument("--band-seeds", type=int, nargs="*", default=[], help="more fp32-only seeds for the band")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--controls", nargs="+", default=["amax_floor"], choices=CONTROLS)
    ap.add_argument("--set", nargs="*", default=[], help="overrides after +experiment=smoke")
    ap.add_argument("--json", help="also write the raw results here")
    a = ap.parse_args()
    results = run_band(Path(a.data), a.steps, a.seeds, ["+experiment=smoke", *a.set], a.procs,
                       controls=tuple(a.controls), band_seeds=a.band_seeds)
    if a.json:
        Path(a.json).write_text(json.dumps(results))
    print(table(results))


if __name__ == "__main__":
    main()
