"""FP8 GEMMs against BF16 on the projection shapes of the tiny, 16b and 671b presets.

For every distinct (in, out) shape of a preset's FP8 projections (model/fp8 `linear_shapes`,
plus the routed experts' w1/w3 and w2), times one linear's forward + backward — the three
GEMMs of a training step, quantisation included — in BF16 and in each FP8 backend available
here, in the same run, and prints the speedup over BF16:

- torch/tensorwise, torch/rowwise: torch._scaled_mm on E4M3 (where the device has an FP8 GEMM)
- emulated/blockwise: the reference path (quantise → dequantise, BF16 GEMM): slower by design
- te/blockwise, te/current, te/delayed: Transformer Engine, when it imports on a CUDA GPU

Imports only torch and the repository's model/ package (no DeepSpeed, Hydra or YAML library),
so it runs on a bare GPU box. On CUDA it times with events over --iters iterations after
warm-up; with --compile (default when Triton is present) the torch and emulated backends and
the BF16 baseline are each wrapped in torch.compile, fusing the quantisation kernels.
On CPU the figures are informative only (no FP8 hardware, and CPU torch's BF16 GEMM is a slow
fallback on CPUs without BF16 instructions), and the default is a short run (--quick): 32
tokens, two shapes per preset, one timed iteration after one warm-up (~3-5 min on 2 cores).

    python bench/fp8_gemm.py                       # everything this machine can run
    python bench/fp8_gemm.py --presets 671b --tokens 16384 --iters 50
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.config import ModelConfig  # noqa: E402
from model.fp8 import linear_shapes, torch_fp8_gemm_works  # noqa: E402
from model.fp8.gemm import Fp8Spec, fp8_linear  # noqa: E402

PRESETS = ("tiny", "16b", "671b")


def load_preset(name: str) -> ModelConfig:
    """conf/model/<name>.yaml is flat `key: value` lines: read without a YAML library."""
    fields = {}
    for line in (ROOT / "conf" / "model" / f"{name}.yaml").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, value = (s.strip() for s in line.split(":", 1))
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        fields[key] = value
    return ModelConfig(**fields)


def preset_shapes(name: str) -> list[tuple[str, int, int]]:
    """(names, in, out) per distinct shape: the factory's linears and the routed experts'."""
    cfg = load_preset(name)
    by_shape: dict[tuple[int, int], list[str]] = {}
    for lname, k, n in linear_shapes(cfg):
        by_shape.setdefault((k, n), []).append(lname)
    if cfg.n_routed_experts:
        by_shape.setdefault((cfg.dim, cfg.moe_inter_dim), []).append("experts.w1/w3")
        by_shape.setdefault((cfg.moe_inter_dim, cfg.dim), []).append("experts.w2")
    return [("+".join(sorted(set(v))), k, n) for (k, n), v in by_shape.items()]


def backends(device: torch.device) -> dict[str, object]:
    """name → spec (Fp8Spec, ("te", recipe) or None for BF16) of what can run here."""
    out: dict[str, object] = {"bf16": None}
    if torch_fp8_gemm_works(device):
        out["torch/tensorwise"] = Fp8Spec("torch", "tensorwise")
        out["torch/rowwise"] = Fp8Spec("torch", "rowwise")
    out["emulated/blockwise"] = Fp8Spec("emulated", "blockwise")
    if device.type == "cuda":
        try:
            import transformer_engine.pytorch  # noqa: F401

            from model.fp8.te import TE_RECIPES

            cap = torch.cuda.get_device_capability(device)
            for recipe in ("blockwise", "current", "delayed"):
                if cap >= TE_RECIPES[recipe][1]:
                    out[f"te/{recipe}"] = ("te", recipe)
        except ImportError:
            pass
    return out


def make_step(spec, k: int, n: int, m: int, device: torch.device, compile_: bool):
    """A closure running one forward + backward of an (m, k) × (k → n) linear in BF16 inputs."""
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    if isinstance(spec, tuple):  # Transformer Engine
        from model.fp8 import te

        lin = te.linear(k, n).to(device=device, dtype=torch.bfloat16)

        def step():
            with te.autocast(spec[1]):
                y = lin(x)
            y.backward(dy)
        return step
    w = (torch.randn(n, k, device=device, dtype=torch.bfloat16) * k ** -0.5).requires_grad_(True)
    fn = (lambda a, b: F.linear(a, b)) if spec is None else (lambda a, b: fp8_linear(a, b, spec))
    if compile_:
        fn = torch.compile(fn)

    def step():
        fn(x, w).backward(dy)
    return step


def time_step(step, device: torch.device, iters: int, warmup: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            torch.cuda.synchronize(device)
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    ap.add_argument("--tokens", type=int, default=0, help="rows M of each GEMM (default 8192 on CUDA, 32 on CPU)")
    ap.add_argument("--iters", type=int, default=0, help="timed iterations (default 20 on CUDA, 1 on CPU)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed iterations first (default 5 on CUDA, 1 on CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action=argparse.BooleanOptionalAction, default=None,
                    help="per preset only the experts' w1/w3 shape and attn.wkv_a's (default on CPU)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the BF16/torch/emulated linears (default: on CUDA with Triton)")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    m = args.tokens or (8192 if gpu else 32)
    iters, warmup = args.iters or (20 if gpu else 1), args.warmup or (5 if gpu else 1)
    quick = (not gpu) if args.quick is None else args.quick
    if args.compile is None:
        try:
            import triton  # noqa: F401

            args.compile = gpu
        except ImportError:
            args.compile = False
    if not gpu:
        torch.set_num_threads(max(1, torch.get_num_threads()))
    names = backends(device)
    print(f"device {torch.cuda.get_device_name(device) if gpu else 'cpu'}, torch {torch.__version__}, "
          f"M={m} tokens, median of {iters} fwd+bwd after {warmup} warm-up, compile={args.compile}")
    print(f"backends: {', '.join(names)}" + ("" if any(b.startswith("te/") for b in names)
                                            else " (Transformer Engine: not available here)"))
    header = ["preset", "layers", "in", "out", "bf16 ms"] + [f"{b} ×" for b in names if b != "bf16"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for preset in args.presets:
        shapes = preset_shapes(preset)
        if quick:
            shapes = [s for s in shapes if "experts.w1" in s[0] or "attn.wkv_a" in s[0].split("+")]
        for lname, k, n in shapes:
            row, base = [preset, lname, str(k), str(n)], None
            for b, spec in names.items():
                try:
                    sec = time_step(make_step(spec, k, n, m, device, args.compile and not isinstance(spec, tuple)),
                                    device, iters, warmup)
                except Exception as exc:  # one backend failing on one shape must not end the table
                    row.append(f"n/a ({type(exc).__name__})")
                    continue
                if spec is None:
                    base = sec
                    row.append(f"{sec * 1e3:.2f}")
                else:
                    row.append(f"{base / sec:.2f}" if base else "n/a")
            print("| " + " | ".join(row) + " |", flush=True)
            if gpu:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
