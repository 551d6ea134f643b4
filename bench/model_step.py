"""One training step of moeforge's model against transformers' DeepseekV3ForCausalLM.

Both models get the same config, batch, thread count and optimizer (AdamW); the two are
alternated step by step in one process so drift of the machine hits both equally. For
transformers, every experts implementation it offers is tried and the fastest that trains
on this device is the baseline. Peak memory is measured per model in a fresh child process
during two steps, so the two do not pollute each other: on the CPU the peak RSS of the whole
process, on CUDA the peak memory torch allocated on the device.

Imports torch, the repository's model/ package and (inside functions) transformers: no
DeepSpeed, Hydra or YAML library, so it runs on a bare GPU box (bench/gpu_check.py).

    python bench/model_step.py                 # smoke preset and a larger CPU config
    python bench/model_step.py --configs smoke --steps 10
    python bench/model_step.py --device cuda   # both models on the GPU, fp32
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the preset reader beside it, when imported too

from fp8_gemm import load_preset  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

# A larger CPU config: 8 layers, 64 routed experts top-6, query compression, MTP off
# (transformers does not train MTP), sequences of 512.
LARGE = dict(vocab_size=8192, dim=512, inter_dim=1408, moe_inter_dim=192, n_layers=6, n_dense_layers=1,
             n_heads=8, n_routed_experts=32, n_shared_experts=1, n_activated_experts=6, n_expert_groups=4,
             n_limited_groups=2, score_func="sigmoid", route_scale=2.5, q_lora_rank=192, kv_lora_rank=128,
             qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_mtp_layers=0, max_seq_len=512,
             original_seq_len=512)
SHAPES = {"smoke": (8, 256), "large": (4, 512)}  # (micro batch, seq_len)


def build_config(name: str) -> ModelConfig:
    if name == "smoke":
        cfg = load_preset("smoke")
        cfg.n_mtp_layers = 0  # transformers' model has no MTP training path: compare like with like
        return cfg.validate()
    return ModelConfig(**LARGE).validate()


def hf_model(cfg: ModelConfig, experts_impl: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    from model.hf_config import to_hf_config

    d = to_hf_config(cfg)
    hf_cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    hf_cfg._experts_implementation = experts_impl
    return AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")


class Runner:
    """A model, its AdamW and a fixed batch; `step()` runs forward, cross-entropy, backward, update."""

    def __init__(self, kind: str, cfg: ModelConfig, batch: torch.Tensor, experts_impl: str = "eager"):
        torch.manual_seed(0)
        self.kind = kind
        self.model = Transformer(cfg) if kind == "moeforge" else hf_model(cfg, experts_impl)
        self.model.to(batch.device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        self.inputs, self.labels = batch[:, :-1], batch[:, 1:]

    def step(self) -> float:
        if self.kind == "moeforge":
            loss = self.model.losses(self.inputs, self.labels).main
        else:
            logits = self.model(input_ids=self.inputs).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), self.labels.flatten())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()  # waits for the device: the callers time whole steps


def fastest_hf_impl(cfg: ModelConfig, batch: torch.Tensor) -> tuple[str, dict[str, str]]:
    """Try every experts implementation transformers offers; keep the fastest that trains here."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        impls = list(ALL_EXPERTS_FUNCTIONS)
    except ImportError:  # a transformers without the registry (a GPU image's own version): eager only
        impls = []

    notes, best = {}, None
    copies = batch[:, :-1].numel() * cfg.n_activated_experts
    for impl in ["eager", *impls]:
        # batched_mm gathers one (2F, D) weight matrix per token copy: skip it where that
        # alone would take more than 2 GiB (it is the slowest by far where it fits).
        gathered = copies * 3 * cfg.dim * cfg.moe_inter_dim * 4  # float32 bytes
        if impl == "batched_mm" and gathered > 2**31:
            notes[impl] = f"skipped: would gather {gathered / 2**30:.1f} GiB of expert weights"
            continue
        try:
            runner = Runner("hf", cfg, batch, impl)
            runner.step()
            t0 = time.perf_counter()
            runner.step()
            dt = time.perf_counter() - t0
        except Exception as exc:  # a kernel without a backward on this device, for example
            notes[impl] = f"fails: {str(exc).splitlines()[0][:80]}"
            continue
        notes[impl] = f"{dt * 1e3:.0f} ms/step"
        if best is None or dt < best[1]:
            best = (impl, dt)
    if best is None:
        raise RuntimeError(f"no transformers experts implementation trains on {batch.device}: {notes}")
    return best[0], notes


def make_batch(cfg: ModelConfig, config: str, device: str) -> torch.Tensor:
    B, T = SHAPES[config]  # drawn on the CPU: the same tokens on every device
    return torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0)).to(device)


def peak_memory_child(kind: str, config: str, impl: str, steps: int, device: str) -> float:
    """Peak memory (MiB) of `steps` training steps of one model in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--device", device, "--memory-child", kind, config, impl,
                          str(steps)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory_child(kind: str, config: str, impl: str, steps: int, device: str) -> None:
    cfg = build_config(config)
    runner = Runner(kind, cfg, make_batch(cfg, config, device), impl)
    runner.step()  # optimizer state now exists
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
    for _ in range(steps):
        runner.step()
    if device == "cuda":
        print(torch.cuda.max_memory_allocated() / 2**20)
        return
    status = Path("/proc/self/status").read_text()
    print(int(status.split("VmHWM:")[1].split()[0]) / 1024)  # kB → MiB, peak RSS of the whole process


def run(config: str, steps: int, warmup: int, device: str) -> dict:
    cfg = build_config(config)
    batch = make_batch(cfg, config, device)
    B, T = SHAPES[config]
    impl, notes = fastest_hf_impl(cfg, batch)
    ours, theirs = Runner("moeforge", cfg, batch), Runner("hf", cfg, batch, impl)
    for _ in range(warmup):
        ours.step()
        theirs.step()
    t_ours, t_hf = [], []
    for _ in range(steps):  # alternate so machine noise hits both
        t0 = time.perf_counter()
        ours.step()
        t_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        theirs.step()
        t_hf.append(time.perf_counter() - t0)
    tokens = B * T
    res = {
        "config": config, "device": device, "tokens_per_step": tokens, "threads": torch.get_num_threads(),
        "hf_experts": impl, "hf_impls": notes,
        "ours_tok_s": tokens / statistics.median(t_ours), "hf_tok_s": tokens / statistics.median(t_hf),
        "ours_peak_mib": peak_memory_child("moeforge", config, impl, 2, device),
        "hf_peak_mib": peak_memory_child("hf", config, impl, 2, device),
    }
    res["ratio"] = res["ours_tok_s"] / res["hf_tok_s"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["smoke", "large"], choices=list(SHAPES))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where both models run (peak memory: process RSS on cpu, device allocations on cuda)")
    ap.add_argument("--json", type=str, default="", help="also write the results to this file")
    ap.add_argument("--memory-child", nargs=4, metavar=("KIND", "CONFIG", "IMPL", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        kind, config, impl, steps = args.memory_child
        memory_child(kind, config, impl, int(steps), args.device)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: no CUDA device visible to torch")
    rows = [run(c, args.steps, args.warmup, args.device) for c in args.configs]
    print(f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
          + f", torch {torch.__version__}, fp32, median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'config':<8}{'tokens/step':>12}{'moeforge tok/s':>16}{'transformers tok/s':>20}{'ratio':>8}"
          f"{'ours peak MiB':>15}{'hf peak MiB':>13}  hf experts")
    for r in rows:
        print(f"{r['config']:<8}{r['tokens_per_step']:>12}{r['ours_tok_s']:>16.0f}{r['hf_tok_s']:>20.0f}"
              f"{r['ratio']:>8.2f}{r['ours_peak_mib']:>15.0f}{r['hf_peak_mib']:>13.0f}  {r['hf_experts']}")
    for r in rows:
        print(f"{r['config']}: transformers experts implementations tried: {r['hf_impls']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
