"""Unit tests of the single-device model: routing, experts, balance loss, bias update, MTP, RoPE."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, Transformer, flops_per_token, param_counts, update_expert_bias
from model.moe import Gate, LocalDispatcher, MoE, load_stats
from model.rope import inv_frequencies, yarn_mscale


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=3, n_dense_layers=1, n_heads=2,
                n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4, n_limited_groups=2,
                score_func="sigmoid", route_scale=2.5, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=4, v_head_dim=8, n_mtp_layers=1, max_seq_len=32, original_seq_len=32, init_std=0.2)
    base.update(kw)
    return ModelConfig(**base).validate()


def reference_gate(x, weight, bias, cfg):
    """DeepSeek's routing written token by token, independently of model/moe.py."""
    E, G = cfg.n_routed_experts, cfg.n_expert_groups
    all_w, all_i = [], []
    for t in range(x.size(0)):
        logits = [float(weight[e].detach().double() @ x[t].double()) for e in range(E)]
        if cfg.score_func == "softmax":
            m = max(logits)
            z = sum(math.exp(v - m) for v in logits)
            s = [math.exp(v - m) / z for v in logits]
        else:
            s = [1 / (1 + math.exp(-v)) for v in logits]
        b = [s[e] + float(bias[e]) for e in range(E)]
        per = E // G
        # DeepSeek's reference: V2 (softmax) scores a group by its best expert, V3 (sigmoid, with
        # the correction bias) by the sum of its two best biased experts.
        if cfg.score_func == "softmax":
            group_score = [max(b[g * per:(g + 1) * per]) for g in range(G)]
        else:
            group_score = [sum(sorted(b[g * per:(g + 1) * per], reverse=True)[:2]) for g in range(G)]
        kept = sorted(range(G), key=lambda g: -group_score[g])[:cfg.n_limited_groups]
        allowed = [e for e in range(E) if e // per in kept]
        chosen = sorted(allowed, key=lambda e: -b[e])[:cfg.n_activated_experts]
        w = [s[e] for e in chosen]
        if cfg.score_func == "sigmoid":
            w = [v / sum(w) for v in w]
        all_w.append([v * cfg.route_scale for v in w])
        all_i.append(chosen)
    return torch.tensor(all_w, dtype=torch.float64), torch.tensor(all_i)


@pytest.mark.parametrize("score_func, bias, groups", [
    ("sigmoid", True, 4),
    ("softmax", False, 4),  # DeepSeek-V2: no selection bias, groups scored by their best expert
    ("softmax", True, 4),  # ours: V2 routing with the aux-loss-free bias, still max-scored groups
    ("softmax", False, 16),  # groups of one expert (the reference allows them under softmax)
])
def test_gate_matches_token_by_token_reference(score_func, bias, groups):
    torch.manual_seed(0)
    cfg = small_cfg(score_func=score_func, n_routed_experts=16, n_activated_experts=3, n_expert_groups=groups,
                    n_limited_groups=2 if groups == 4 else 5)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    if bias:
        gate.e_score_correction_bias.copy_(torch.randn(16) * 0.3)  # negative biases included
    x = torch.randn(40, cfg.dim)
    w, idx, _ = gate(x)
    ref_w, ref_idx = reference_gate(x, gate.weight, gate.e_score_correction_bias, cfg)
    order = idx.sort(dim=-1)
    ref_order = ref_idx.sort(dim=-1)
    assert torch.equal(order.values, ref_order.values)
    torch.testing.assert_close(w.gather(1, order.indices).double(), ref_w.gather(1, ref_order.indices),
                               atol=1e-5, rtol=1e-5)


def test_masked_groups_use_minus_inf_not_zero():
    """With negative biased scores a 0-filled masked group would win; -inf must keep it out."""
    cfg = small_cfg(n_routed_experts=8, n_expert_groups=4, n_limited_groups=1, n_activated_experts=2)
    gate = Gate(cfg)
    torch.nn.init.zeros_(gate.weight)  # every sigmoid score is 0.5
    gate.e_score_correction_bias.copy_(torch.tensor([-0.7, -0.7, -0.9, -0.9, -0.9, -0.9, -0.9, -0.9]))
    _, idx, _ = gate(torch.randn(5, cfg.dim))
    assert set(idx.flatten().tolist()) == {0, 1}


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """A loop over tokens and their experts (the reference's semantics), no sorting."""
    flat = x.reshape(-1, x.size(-1))
    w, idx, _ = moe.gate(flat)
    ex = moe.experts
    out = torch.zeros_like(flat)
    for t in range(flat.size(0)):
        for k in range(idx.size(1)):
            e = idx[t, k]
            h = F.silu(flat[t] @ ex.w1[e].T) * (flat[t] @ ex.w3[e].T)
            out[t] += w[t, k] * (h @ ex.w2[e].T)
    return (out + moe.shared_experts(flat)).view_as(x)


def test_moe_matches_naive_per_token_loop_forward_and_backward():
    torch.manual_seed(1)
    cfg = small_cfg()
    model = Transformer(cfg)
    moe = model.layers["1"].ffn
    moe.balance_alpha = 0.0
    x = torch.randn(2, 7, cfg.dim, requires_grad=True)
    y = moe(x)
    x2 = x.detach().clone().requires_grad_()
    y_ref = naive_moe(moe, x2)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    params = [moe.experts.w1, moe.experts.w2, moe.experts.w3, moe.gate.weight]
    grads = torch.autograd.grad(y, [x, *params], g)
    grads_ref = torch.autograd.grad(y_ref, [x2, *params], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_extreme_imbalance_every_token_to_the_same_experts():
    cfg = small_cfg(n_expert_groups=1, n_limited_groups=1)
    model = Transformer(cfg)
    moe = model.layers["1"].ffn
    moe.gate.e_score_correction_bias.copy_(torch.tensor([100.0, 100.0, 0, 0, 0, 0, 0, 0]))
    x = torch.randn(1, 9, cfg.dim)
    moe.train()
    y = moe(x)
    torch.testing.assert_close(y, naive_moe(moe, x), atol=1e-5, rtol=1e-5)
    assert moe.tokens_per_expert.tolist() == [9, 9, 0, 0, 0, 0, 0, 0]


def test_balance_loss_changes_router_gradient_but_not_the_output():
    torch.manual_seed(2)
    cfg = small_cfg()
    model = Transformer(cfg).double().train()
    moe = model.layers["1"].ffn
    x = torch.randn(3, 5, cfg.dim, dtype=torch.float64)
    outs, grads = [], []
    for alpha in (0.0, 0.5):
        moe.balance_alpha = alpha
        moe.gate.weight.grad = None
        y = moe(x)
        y.pow(2).sum().backward()
        outs.append(y.detach())
        grads.append(moe.gate.weight.grad.clone())
    assert torch.equal(outs[0], outs[1])  # same value with and without the balance loss
    # The difference of router gradients is exactly d(balance loss)/d(router).
    w, idx, scores = moe.gate(x.view(-1, cfg.dim))
    s = scores / scores.sum(-1, keepdim=True)
    E, K, T = cfg.n_routed_experts, cfg.n_activated_experts, 5
    f = F.one_hot(idx, E).sum(1).view(3, T, E).sum(1).double() * E / (K * T)
    aux = 0.5 * (f * s.view(3, T, E).mean(1)).sum(-1).mean()
    (expected,) = torch.autograd.grad(aux, moe.gate.weight)
    torch.testing.assert_close(grads[1] - grads[0], expected, atol=1e-6 * expected.abs().max().item(), rtol=1e-6)
    assert expected.abs().max() > 0
    torch.testing.assert_close(moe.balance_loss_sum, aux.detach())


def test_expert_bias_update_follows_the_sign_rule_and_counts_accumulate():
    cfg = small_cfg(n_expert_groups=1, n_limited_groups=1)
    model = Transformer(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (2, 8))
    for _ in range(3):  # three micro-batches before one optimizer step
        model.losses(x[:, :-1], x[:, 1:])
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    before = [m.tokens_per_expert.clone() for m in moes]
    for b in before[:-1]:
        assert b.sum() == 3 * 14 * cfg.n_activated_experts
    assert before[-1].sum() == 3 * 12 * cfg.n_activated_experts  # the MTP block sees T-1 positions
    biases = [m.gate.e_score_correction_bias.clone() for m in moes]
    reduced = []
    load = update_expert_bias(model, gamma=0.01, reduce_counts=lambda c: reduced.append(c.mul_(2)))
    assert reduced and torch.equal(load, torch.stack(before) * 2)
    for m, c, b in zip(moes, before, biases):
        expected = b - 0.01 * torch.sign(c - c.mean())
        assert torch.equal(m.gate.e_score_correction_bias, expected)
        assert m.tokens_per_expert.sum() == 0
    stats = load_stats(load)
    assert stats["expert_load_max_over_mean"] >= 1.0 and stats["expert_load_cv"] >= 0.0


def test_bias_is_float32_buffer_saved_in_state_dict_and_not_a_parameter():
    model = Transformer(small_cfg()).to(torch.bfloat16)
    moe = model.layers["1"].ffn
    assert moe.gate.weight.dtype == torch.bfloat16
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert moe.tokens_per_expert.dtype == torch.float32
    names = dict(model.named_parameters())
    assert not any("e_score_correction_bias" in n for n in names)
    assert "layers.1.ffn.gate.e_score_correction_bias" in model.state_dict()
    assert "layers.1.ffn.tokens_per_expert" not in model.state_dict()


def test_mtp_loss_matches_manual_computation():
    torch.manual_seed(3)
    cfg = small_cfg(n_mtp_layers=2)
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    inp, labels = tokens[:, :-1], tokens[:, 1:]
    losses = model.losses(inp, labels)
    torch.testing.assert_close(losses.main, F.cross_entropy(model(inp).flatten(0, 1), labels.flatten()))
    h = model.norm(model.hidden(inp))
    T = inp.size(1)
    manual = []
    for k in (1, 2):
        mod = model.mtp[str(k - 1)]
        n = T - k
        x = mod.eh_proj(torch.cat([mod.enorm(model.embed(labels[:, k - 1:k - 1 + n])), mod.hnorm(h[:, :n])], -1))
        h = mod.norm(mod.block(x, model.rope_cos[:n], model.rope_sin[:n]))
        manual.append(F.cross_entropy(model.head(h).flatten(0, 1), labels[:, k:].flatten()))
    torch.testing.assert_close(losses.mtp, torch.stack(manual).mean())


def test_attention_is_causal():
    torch.manual_seed(4)
    model = Transformer(small_cfg()).eval()
    a = torch.randint(0, 64, (1, 10))
    b = a.clone()
    b[0, 6:] = (b[0, 6:] + 1) % 64
    torch.testing.assert_close(model(a)[:, :6], model(b)[:, :6])
    assert not torch.allclose(model(a)[:, 6:], model(b)[:, 6:])


def test_training_step_lowers_loss():
    torch.manual_seed(5)
    cfg = small_cfg()
    model = Transformer(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, cfg.vocab_size, (4, 17))
    first = None
    for _ in range(30):
        loss = model.losses(tokens[:, :-1], tokens[:, 1:])
        (loss.main + 0.3 * loss.mtp).backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else loss.main.item()
    assert loss.main.item() < 0.5 * first


def test_yarn_frequencies_and_mscale():
    cfg = small_cfg(qk_rope_head_dim=64, max_seq_len=4096 * 4, original_seq_len=4096, rope_factor=4.0,
                    beta_fast=32, beta_slow=1, mscale=0.707)
    inv = inv_frequencies(cfg)
    base = 1.0 / (10000.0 ** (torch.arange(0, 64, 2).double() / 64))
    # Dimensions rotating more than beta_fast times over the original length keep their frequency;
    # those rotating less than beta_slow times are interpolated by 1/rope_factor.
    rotations = 4096 * base / (2 * math.pi)
    keep = rotations > 32
    interp = rotations < 1
    assert keep.any() and interp.any()
    torch.testing.assert_close(inv[keep].double(), base[keep], rtol=1e-6, atol=0)
    torch.testing.assert_close(inv[interp].double(), base[interp] / 4, rtol=1e-6, atol=0)
    assert yarn_mscale(cfg) == pytest.approx(0.1 * 0.707 * math.log(4.0) + 1)
    assert yarn_mscale(small_cfg()) == 1.0  # inactive when max_seq_len <= original_seq_len
    torch.testing.assert_close(inv_frequencies(small_cfg(qk_rope_head_dim=64)).double(), base.float().double())


def test_flops_per_token_matches_hand_count():
    cfg = small_cfg(n_mtp_layers=0)
    T = 16
    n = param_counts(cfg).activated
    attn = cfg.n_layers * 6 * T * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) / 2
    assert flops_per_token(cfg, T) == 6 * n + attn
    # Activated parameters: everything a token multiplies, i.e. all but the unrouted experts and the embedding.
    model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    unrouted = (cfg.n_routed_experts - cfg.n_activated_experts) * 3 * cfg.dim * cfg.moe_inter_dim * 2
    assert n == total - unrouted - cfg.vocab_size * cfg.dim


def test_local_dispatcher_round_trip_with_identity_experts():
    class Identity(torch.nn.Module):
        n_experts = 8

        def forward(self, x, counts):
            assert counts.sum() == x.size(0)
            return x

    x = torch.randn(6, 4)
    idx = torch.tensor([[0, 7], [3, 3 - 1], [7, 0], [5, 1], [1, 5], [2, 6]])
    w = torch.full((6, 2), 0.5)
    torch.testing.assert_close(LocalDispatcher()(x, idx, w, Identity()), x)
