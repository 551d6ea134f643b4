"""fp8.backend=te on the CPU through the Transformer Engine stand-in (tests/te_standin), in-process.

- The stand-in behaves as TE where a caller can be bitten (device default, init at construction,
  `_extra_state`, dimension checks, m_splits) and computes with the emulated FP8 recipe its TE
  recipe maps to.
- Initialisation independent of the module class: a meta build, `to_empty` onto memory filled with NaN, then init gives —
  for every FP8 backend, te included — bit for bit the weights of the fp8=off model with the same
  seed, for the whole model (parallel/build.py), an expert-parallel shard, and every pipeline
  stage's layers (parallel/pipeline.py).
"""

from __future__ import annotations

import itertools
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import Transformer
from model.config import ModelConfig
from model.fp8.gemm import Fp8Spec, fp8_linear, grouped_fp8_linear
from model.linear import Precision, precision
from model.moe import Experts
from parallel.build import build_model
from parallel.pipeline import BlockPipe, OutputPipe, SharedEmbedding
from parallel.topology import Groups, Layout
from train.config import compose, model_config

SEED = 11
BACKENDS = {"off": Precision(), "emulated": Precision("emulated", "blockwise"),
            "torch": Precision("torch", "rowwise"), "te": Precision("te", "blockwise")}


def smoke() -> ModelConfig:
    return model_config(compose(["model=smoke"]).model)


# ------------------------------------------------------------------ the stand-in itself
def test_standin_bites_like_te(te_standin):
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe as R

    assert "stand-in" in te_standin.__doc__.lower() and "standin" in te_standin.__version__
    # device defaults to "cuda" and is passed explicitly: a meta context does not reach the weights.
    with torch.device("meta"), pytest.raises((AssertionError, RuntimeError)):
        te.Linear(32, 16, bias=False)
    assert te.Linear(32, 16, bias=False, device="meta").weight.is_meta
    # Built on a real device, TE initialises at once: Normal(0, 0.023) from the global RNG.
    torch.manual_seed(3)
    lin = te.Linear(32, 16, bias=False, device="cpu")
    torch.manual_seed(3)
    assert torch.equal(lin.weight, torch.empty(16, 32).normal_(0.0, 0.023))
    assert [n for n, _ in lin.named_parameters()] == ["weight"] and lin.bias.numel() == 0
    assert list(lin.state_dict()) == ["weight", "_extra_state"]
    assert lin.state_dict()["_extra_state"].dtype == torch.uint8 and lin.state_dict()["_extra_state"].numel() == 0

    x = torch.randn(4, 8, 32)
    assert torch.equal(lin(x), F.linear(x, lin.weight))  # outside autocast: high precision
    block = R.Float8BlockScaling()
    with te.fp8_autocast(enabled=True, fp8_recipe=block):
        y = lin(x)
    assert torch.equal(y, fp8_linear(x, lin.weight, Fp8Spec("emulated", "blockwise", 128, True)))
    assert not torch.equal(y, F.linear(x, lin.weight))
    with te.autocast(recipe=R.Float8CurrentScaling()):
        y = lin(x)
    assert torch.equal(y, fp8_linear(x, lin.weight, Fp8Spec("emulated", "tensorwise", 128, False)))
    with te.autocast(recipe=block), pytest.raises(ValueError, match="divisible by 8"):
        lin(torch.randn(2, 63, 32))  # 126 rows: TE's FP8 GEMM refuses them

    # GroupedLinear: weight0..weight{n-1}, rows split by m_splits, each split aligned under FP8.
    gl = te.GroupedLinear(3, 32, 16, bias=False, device="cpu")
    assert [n for n, _ in gl.named_parameters()] == ["weight0", "weight1", "weight2"]
    x = torch.randn(48, 32, requires_grad=True)
    splits = [16, 0, 32]
    ref = torch.cat([x[:16] @ gl.weight0.T, x[16:] @ gl.weight2.T])
    assert torch.equal(gl(x, splits), ref)
    with te.autocast(recipe=block):
        y = gl(x, torch.tensor(splits))
        with pytest.raises(ValueError, match="multiple of 16"):
            gl(x, [8, 8, 32])
    w = torch.stack([gl.weight0, gl.weight1, gl.weight2])
    assert torch.equal(y, grouped_fp8_linear(x, w, splits, Fp8Spec("emulated", "blockwise", 128, True)))
    y.sum().backward()
    assert gl.weight1.grad.abs().sum() == 0 and gl.weight0.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="number of GEMMs"):
        gl(x, [48])

    # Delayed scaling: `_extra_state` becomes a pickle after the first FP8 forward (its size changes).
    lin2 = te.Linear(32, 16, bias=False, device="cpu")
    assert lin2.state_dict()["_extra_state"].numel() == 0
    with te.autocast(recipe=R.DelayedScaling(amax_history_len=4)):
        lin2(torch.randn(8, 32))
    state = lin2.state_dict()["_extra_state"]
    assert state.numel() > 0 and isinstance(pickle.loads(state.numpy().tobytes())["recipe"], R.DelayedScaling)
    lin3 = te.Linear(32, 16, bias=False, device="cpu")
    lin3.load_state_dict(lin2.state_dict())  # set_extra_state restores the metadata
    a, b = (pickle.loads(t.numpy().tobytes()) for t in (lin3.state_dict()["_extra_state"], state))
    assert a["recipe"] == b["recipe"] and torch.equal(a["amax_history_fwd"], b["amax_history_fwd"])
    assert b["amax_history_fwd"].shape == (4, 3) and b["amax_history_fwd"][0, :2].gt(0).all()
    assert torch.equal(lin3.weight, lin2.weight)
    with pytest.raises(AssertionError, match="E5M2"):
        R.DelayedScaling(fp8_format=R.Format.E5M2)


def test_te_backend_calls_through_the_standin(te_standin, monkeypatch):
    """model/fp8/te.py against the stand-in: CPU admitted, recipes by name, both autocast names,
    MTP's ragged row count padded to TE's FP8 multiple of 8."""
    import transformer_engine.pytorch as te_mod
    from transformer_engine.common import recipe as R

    from model.fp8 import te

    te.check("blockwise", torch.device("cpu"))  # the stand-in's marker admits the CPU
    monkeypatch.delattr(te_standin, "IS_MOEFORGE_TEST_STANDIN")
    with pytest.raises(Exception, match="needs an NVIDIA GPU"):
        te.check("blockwise", torch.device("cpu"))
    kinds = {"blockwise": R.Float8BlockScaling, "current": R.Float8CurrentScaling, "delayed": R.DelayedScaling,
             "mxfp8": R.MXFP8BlockScaling}
    from transformer_engine.pytorch import quantization as Q

    for name, kind in kinds.items():
        with te.autocast(name):
            assert isinstance(Q.active_recipe(), kind), name
        assert Q.active_recipe() is None
    monkeypatch.delattr(te_mod, "autocast")  # TE 2.4–2.8: only fp8_autocast
    with pytest.warns(DeprecationWarning), te.autocast("current"):
        assert isinstance(Q.active_recipe(), R.Float8CurrentScaling)

    # B·(T−1) = 126 rows (MTP depth 1): TE refuses them in FP8; the backend's Linear pads to 128.
    with torch.device("meta"):
        lin = te.linear(64, 32)
    assert isinstance(lin, te_mod.Linear) and lin.weight.is_meta
    lin.to_empty(device="cpu")
    torch.nn.init.normal_(lin.weight)
    x = torch.randn(2, 63, 64, requires_grad=True)
    with te.autocast("current"):
        y = lin(x)
    ref_x = x.detach().clone().requires_grad_()
    ref_w = lin.weight.detach().clone().requires_grad_()
    ref = fp8_linear(ref_x, ref_w, Fp8Spec("emulated", "tensorwise"))
    assert y.shape == (2, 63, 32) and torch.allclose(y, ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    assert torch.allclose(x.grad, ref_x.grad, rtol=1e-6, atol=1e-6)
    assert torch.allclose(lin.weight.grad, ref_w.grad, rtol=1e-5, atol=1e-6)


def test_te_grouped_experts_through_the_standin_equal_the_emulated_experts(te_standin):
    """model/fp8/te.py GroupedExperts (te.GroupedLinear per projection, the stacked weights bound as
    weight{i} views, rows padded per expert to 16) equals the emulated grouped experts with the
    spec the stand-in gives Float8BlockScaling, in output and every gradient; row counts that are
    not multiples of 16 and an empty expert included (the GPU test's case, tests/unit/test_fp8.py)."""
    from model.fp8 import te
    from model.fp8.grouped import grouped_fp8_swiglu

    sizes = [37, 0, 130, 5, 16]  # 130: two 128-token tiles of the weight gradient, the second padded
    D, F_ = 128, 64
    g = torch.Generator().manual_seed(12)
    x = torch.randn(sum(sizes), D, generator=g)
    ws = [torch.randn(len(sizes), F_, D, generator=g) * 0.05, torch.randn(len(sizes), D, F_, generator=g) * 0.05,
          torch.randn(len(sizes), F_, D, generator=g) * 0.05]
    dy = torch.randn(sum(sizes), D, generator=g)
    experts = te.GroupedExperts(len(sizes), D, F_, "blockwise")

    def run(fn):
        xx, ww = x.clone().requires_grad_(True), [w.clone().requires_grad_(True) for w in ws]
        y = fn(xx, ww)
        y.backward(dy)
        return [y.detach(), xx.grad, *(w.grad for w in ww)]

    def te_fn(xx, ww):
        with te.autocast("blockwise"):
            return experts(xx, sizes, *ww)

    got = run(te_fn)
    emu = run(lambda xx, ww: grouped_fp8_swiglu(xx, *ww, sizes, Fp8Spec("emulated", "blockwise", pow2=True)))
    for name, a, b in zip(("y", "dx", "dw1", "dw2", "dw3"), got, emu):
        assert a is not None, name
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (name, (a - b).abs().max())
    assert torch.equal(got[2][1], torch.zeros_like(ws[0][1]))  # the empty expert gets no gradient
    assert not torch.allclose(got[0], run(lambda xx, ww: grouped_fp8_swiglu(  # FP8 ran: not fp32's output
        xx, *ww, sizes, Fp8Spec("emulated", "tensorwise")))[0], rtol=1e-3)


# ------------------------------------------------------------------ defect 1: init on every backend
@pytest.fixture
def nan_after_to_empty(monkeypatch):
    """Every `to_empty` leaves NaN in the new memory (uninitialised memory made visible)."""
    original = nn.Module.to_empty

    def to_empty(self, *, device, recurse=True):
        out = original(self, device=device, recurse=recurse)
        with torch.no_grad():
            for t in itertools.chain(self.parameters(), self.buffers()):
                if t.is_floating_point():
                    t.fill_(float("nan"))
        return out

    monkeypatch.setattr(nn.Module, "to_empty", to_empty)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    """fp8=off, built on the CPU and initialised with SEED: the weights every backend must reproduce."""
    model = Transformer(smoke())
    model.init_weights(SEED)
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _tensors(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + n: t for n, t in itertools.chain(module.named_parameters(), module.named_buffers())}


def _assert_backend_built(module: nn.Module, backend: str) -> None:
    """The backend really built its modules (not a silent fallback to nn.Linear)."""
    if backend == "te":
        import transformer_engine.pytorch as te

        assert any(isinstance(m, te.Linear) for m in module.modules())
    elif backend in ("emulated", "torch"):
        from model.fp8.gemm import Fp8Linear

        assert any(isinstance(m, Fp8Linear) for m in module.modules())


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_meta_build_initialises_every_backend_like_fp8_off(backend, request, nan_after_to_empty, reference):
    if backend == "te":
        request.getfixturevalue("te_standin")
    cfg = smoke()
    with precision(BACKENDS[backend]):
        with torch.device("meta"):
            meta = Transformer(cfg)
        assert all(t.is_meta for t in itertools.chain(meta.parameters(), meta.buffers()))  # nothing real allocated
        model = build_model(cfg, seed=SEED, device=torch.device("cpu"))
        layout = Layout(2, 1, 2)
        groups = Groups(layout=layout, rank=1, dp=None, ep=None, ep_group_name="ep_size_2")
        shard = build_model(cfg, seed=SEED, device=torch.device("cpu"), groups=groups)
    _assert_backend_built(model, backend)
    got = _tensors(model)
    assert got.keys() == reference.keys()
    for name, t in got.items():
        assert torch.equal(t, reference[name]), name
    # Expert-parallel rank 1 of 2 holds global experts 8..15, drawn with their global ids' seeds,
    # and runs them on the backend's experts (TE's GroupedLinear over its 8 local experts).
    E_l = cfg.n_routed_experts // 2
    for experts in (m for m in shard.modules() if isinstance(m, Experts)):
        assert experts.n_experts == E_l and experts.expert_offset == E_l
        assert (experts.te is not None and experts.te.n_experts == E_l) == (backend == "te")
        assert (experts.fp8 is not None) == (backend in ("emulated", "torch"))
    for name, t in _tensors(shard).items():
        want = reference[name]
        if ".experts.w" in name:
            want = want[E_l:2 * E_l]
        assert torch.equal(t, want), name


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_pipeline_stage_layers_initialise_every_backend_like_fp8_off(backend, request, nan_after_to_empty,
                                                                     reference):
    if backend == "te":
        request.getfixturevalue("te_standin")
    cfg = smoke()
    got = {}
    with precision(BACKENDS[backend]):
        got.update(_tensors(SharedEmbedding(cfg, SEED), "embed."))
        for i in range(cfg.n_layers):
            block = BlockPipe(cfg, i, SEED)
            _assert_backend_built(block, backend)
            got.update(_tensors(block.block, f"layers.{i}."))
        out = OutputPipe(cfg, SEED)
        for name in ("norm", "head", "mtp"):
            got.update(_tensors(getattr(out, name), f"{name}."))
    assert got.keys() == {n for n in reference if not n.startswith("rope_")}
    for name, t in got.items():
        assert torch.equal(t, reference[name]), name


def test_te_671b_builds_on_meta_without_te_initialising_anything(te_standin, monkeypatch):
    """The 671B model under fp8=te built as parallel/build.py builds it: every parameter on meta
    (TE's device="cuda" default would put ~683B parameters in GPU memory) and TE's own init never
    run (it would draw them all)."""
    from transformer_engine.pytorch.module import TransformerEngineBaseModule

    calls = []
    original = TransformerEngineBaseModule.reset_parameters
    monkeypatch.setattr(TransformerEngineBaseModule, "reset_parameters",
                        lambda self, defer_init=False: (calls.append(defer_init), original(self, defer_init))[1])
    cfg = model_config(compose(["model=671b"]).model)
    with precision(BACKENDS["te"]), torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) > 600e9
    assert all(p.is_meta for p in model.parameters())
    assert calls and all(calls)  # TE modules were built, every one with its init deferred
