"""FP8: quantisation against an independent loop reference, the FP8 linear's numerics (SQNR
against float64), the Linear factory's choices, and the capability checks."""

from __future__ import annotations

import math

import pytest
import torch

from model import Transformer
from model.config import ConfigError
from model.fp8 import check_capability, linear_shapes
from model.fp8.gemm import Fp8Linear, Fp8Spec, fp8_linear
from model.fp8.quant import E4M3, E4M3_MAX, dequantize, quantize
from model.linear import Precision, precision
from train.config import compose, model_config, to_config


def reference_fake_quant(x: torch.Tensor, granularity: str, block: int, pow2: bool) -> torch.Tensor:
    """Written independently: loop over every scaling group, scale = max(amax, 1e-4)/448."""
    x = x.double()
    out = torch.empty_like(x)
    R, C = x.shape
    if granularity == "tensor":
        groups = [(slice(0, R), slice(0, C))]
    elif granularity == "row":
        groups = [(slice(r, r + 1), slice(0, C)) for r in range(R)]
    elif granularity == "tile":
        groups = [(slice(r, r + 1), slice(c, min(c + block, C))) for r in range(R) for c in range(0, C, block)]
    else:
        groups = [(slice(r, min(r + block, R)), slice(c, min(c + block, C)))
                  for r in range(0, R, block) for c in range(0, C, block)]
    for rs, cs in groups:
        g = x[rs, cs]
        scale = max(g.abs().max().item(), 1e-4) / 448.0
        scale = torch.tensor(scale, dtype=torch.float32).item()  # the implementation scales in float32
        if pow2:
            scale = 2.0 ** math.ceil(math.log2(scale))
        q = (g.float() / torch.tensor(scale, dtype=torch.float32)).to(E4M3).float()
        out[rs, cs] = q.double() * scale
    return out.float()


@pytest.mark.parametrize("granularity", ["tile", "block", "row", "tensor"])
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("shape", [(256, 384), (200, 130)])  # the second has ragged tiles and blocks
def test_quantise_dequantise_matches_the_loop_reference_bitwise(granularity, pow2, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g) * torch.logspace(-3, 2, shape[1])  # wide dynamic range per column
    q, s = quantize(x, granularity, 128, pow2)
    assert q.dtype == E4M3 and q.shape == x.shape
    got = dequantize(q, s, granularity, 128)
    assert torch.equal(got, reference_fake_quant(x, granularity, 128, pow2))
    if pow2:
        assert torch.equal(torch.log2(s), torch.round(torch.log2(s)))  # powers of two


def test_zeros_and_constant_tiles_do_not_divide_by_zero():
    x = torch.zeros(4, 256)
    x[1] = 3.0  # all-equal tile: amax/448 scale represents it exactly
    for granularity in ("tile", "block", "row", "tensor"):
        q, s = quantize(x, granularity)
        out = dequantize(q, s, granularity)
        assert torch.isfinite(out).all()
        assert torch.equal(out[0], torch.zeros(256)) and torch.allclose(out[1], torch.full((256,), 3.0))
    assert quantize(torch.full((1, 128), 1e6), "tile")[0].float().abs().max() <= E4M3_MAX  # saturates, no inf


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return 20 * math.log10(ref.norm().item() / (ref - out.double()).norm().item())


@pytest.mark.parametrize("backend, recipe, bar", [
    ("emulated", "blockwise", 25.0),  # the (and torchao's) bar for blockwise
    ("emulated", "rowwise", 20.0), ("emulated", "tensorwise", 20.0),  # reported alongside
    ("torch", "rowwise", 20.0), ("torch", "tensorwise", 20.0),
])
def test_fp8_linear_sqnr_against_float64(backend, recipe, bar, capsys):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 384, generator=g)
    x[:, :8] *= 30  # outlier channels, as activations have them
    w = torch.randn(256, 384, generator=g) * 0.05
    dy = torch.randn(512, 256, generator=g)
    xr, wr = x.double().requires_grad_(True), w.double().requires_grad_(True)
    (xr @ wr.t()).backward(dy.double())
    xf, wf = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = fp8_linear(xf, wf, Fp8Spec(backend, recipe))
    y.backward(dy)
    ref_y = (x.double() @ w.double().t())
    got = {"out": sqnr(ref_y, y), "dx": sqnr(xr.grad, xf.grad), "dw": sqnr(wr.grad, wf.grad)}
    with capsys.disabled():
        print(f"\nSQNR dB {backend}/{recipe}: " + ", ".join(f"{k} {v:.1f}" for k, v in got.items()))
    assert all(v >= bar for v in got.values()), got


def test_tiles_keep_precision_where_one_tensor_scale_loses_it():
    """One huge activation channel: a single tensor scale pushes every other value towards E4M3's
    subnormals; 1×128 tiles away from the outlier keep full precision (why DeepSeek tiles)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 512, generator=g)
    x[:, 0] *= 1e5
    from model.fp8.quant import fake_quantize

    rest = x[:, 128:].double()
    tile = sqnr(rest, fake_quantize(x, "tile")[:, 128:])
    tensor = sqnr(rest, fake_quantize(x, "tensor")[:, 128:])
    assert tile > 25 and tile > tensor + 10, (tile, tensor)


def test_torch_backend_equals_emulated_for_its_recipes():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(64, 256, generator=g), torch.randn(128, 256, generator=g)
    for recipe in ("rowwise", "tensorwise"):
        a = fp8_linear(x, w, Fp8Spec("torch", recipe))
        b = fp8_linear(x, w, Fp8Spec("emulated", recipe))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def smoke_cfg():
    return model_config(compose(["model=smoke"]).model)


def test_factory_puts_fp8_where_deepseek_does_and_honours_exclude():
    cfg = smoke_cfg()
    with precision(Precision("emulated", "blockwise", exclude=("attn.wo",))):
        model = Transformer(cfg)
    block = model.layers["1"]
    assert isinstance(block.attn.wq_a, Fp8Linear) and isinstance(block.attn.wkv_b, Fp8Linear)  # MLA projections
    assert type(block.attn.wo) is torch.nn.Linear  # excluded by name
    assert type(model.head) is torch.nn.Linear and type(model.embed) is torch.nn.Embedding  # high precision
    assert block.ffn.experts.fp8 is not None and isinstance(block.ffn.shared_experts.w1, Fp8Linear)
    assert isinstance(model.layers["0"].ffn.w1, Fp8Linear)  # dense MLP
    with torch.no_grad():
        out = model(torch.randint(0, cfg.vocab_size, (2, 16)))
    assert torch.isfinite(out).all()
    with precision(Precision("emulated", "blockwise", exclude=("experts",))):
        assert Transformer(cfg).layers["1"].ffn.experts.fp8 is None


def test_fp8_model_trains_close_to_high_precision():
    """Five optimizer steps of the smoke model with emulated blockwise FP8: same first loss as fp32, and it learns."""
    cfg = smoke_cfg()
    data = torch.randint(0, cfg.vocab_size, (4, 65), generator=torch.Generator().manual_seed(4))
    losses = {}
    for backend in ("off", "emulated"):
        torch.manual_seed(0)
        with precision(Precision(backend, "blockwise")):
            model = Transformer(cfg)
        model.init_weights(seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        run = []
        for _ in range(5):
            loss = model.losses(data[:, :-1], data[:, 1:]).main
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses[backend] = run
    assert losses["emulated"][-1] < losses["emulated"][0] - 0.3  # it learns
    assert abs(losses["off"][0] - losses["emulated"][0]) / losses["off"][0] < 1e-3, losses  # same forward
    # Later steps drift apart through AdamW (measured ≤ 2.5% by step 5); the acceptance
    # comparison is the mean loss over 300 steps, a slow run not made yet (docs/fp8.md).


def test_capability_errors_name_the_alternative():
    cfg = smoke_cfg()
    with pytest.raises(ConfigError, match="fp8.backend=te: needs an NVIDIA GPU .*fp8.backend=emulated runs here"):
        check_capability(Precision("te", "blockwise"), torch.device("cpu"), cfg)
    check_capability(Precision("emulated", "blockwise"), torch.device("cpu"), cfg)  # runs anywhere
    check_capability(Precision("torch", "rowwise"), torch.device("cpu"), cfg)  # CPU _scaled_mm works here
    names = {n for n, _, _ in linear_shapes(cfg)}
    assert {"attn.wq_a", "attn.wkv_b", "attn.wo", "w1", "mtp.eh_proj"} <= names


def test_fp8_config_validation():
    assert to_config(compose(["fp8=emulated"])).fp8.resolved_recipe() == "blockwise"
    assert to_config(compose(["fp8=torch"])).fp8.resolved_recipe() == "rowwise"
    with pytest.raises(ConfigError, match="fp8.recipe='blockwise': fp8.backend=torch offers tensorwise, rowwise"):
        to_config(compose(["fp8=torch", "fp8.recipe=blockwise"]))
    with pytest.raises(ConfigError, match="fp8.backend='fp4'"):
        to_config(compose(["fp8.backend=fp4"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Transformer Engine tests need a CUDA GPU and TE")
def test_te_recipes_against_emulated():  # pragma: no cover - GPU only
    pytest.importorskip("transformer_engine", reason="Transformer Engine is not installed")
    from model.fp8 import te

    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    lin = te.linear(512, 256).cuda()
    ref = fp8_linear(x.float(), lin.weight.float(), Fp8Spec("emulated", "blockwise"))
    for recipe in ("blockwise", "current", "delayed"):
        with te.autocast(recipe):
            out = lin(x)
        assert sqnr(ref.double(), out.float()) > 20
