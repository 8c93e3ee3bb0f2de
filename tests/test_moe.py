"""Tests for moe.py: routing, dropless dispatch, load balancing, auxiliary loss."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe import expert_loop as grouped_swiglu  # noqa: E402
from moe import MoE, MoEConfig, route, router_scores  # noqa: E402

DIM = 16


def make_moe(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = MoEConfig(**{"n_routed_experts": 8, "n_activated_experts": 2, "n_shared_experts": 1,
                       "moe_inter_dim": 8, **overrides})
    return MoE(DIM, cfg)


def reference_choice(moe, x_t, use_groups=True):
    """Per-token routing in plain Python: chosen expert ids and the unbiased scores."""
    cfg = moe.cfg
    logits = moe.gate.weight @ x_t  # (E,)
    s = {"sigmoid": logits.sigmoid, "softmax": lambda: logits.softmax(-1),
         "sqrtsoftplus": lambda: F.softplus(logits).sqrt()}[cfg.score_func]()
    biased = (s + moe.expert_bias).tolist()
    E = cfg.n_routed_experts
    allowed = list(range(E))
    if use_groups and cfg.n_expert_groups > 1:
        size = E // cfg.n_expert_groups
        group_score = []
        for g in range(cfg.n_expert_groups):
            members = sorted(biased[g * size:(g + 1) * size], reverse=True)
            group_score.append(members[0] if size <= 2 else members[0] + members[1])
        kept = sorted(range(cfg.n_expert_groups), key=lambda g: -group_score[g])[:cfg.n_limited_groups]
        allowed = [e for e in allowed if e // size in kept]
    chosen = sorted(allowed, key=lambda e: -biased[e])[:cfg.n_activated_experts]
    return chosen, s


def reference_weights(moe, s, chosen):
    w = s[chosen]
    if moe.cfg.score_func != "softmax":  # softmax's top-k stay raw; the others are normalised
        w = w / w.sum()
    return w * moe.cfg.route_scale


def expert_ffn(moe, e, x_t):
    return moe.w2[e] @ (F.silu(moe.w1[e] @ x_t) * (moe.w3[e] @ x_t))


def reference_forward(moe, x):
    """Brute force: every token, one at a time, through its chosen experts plus the shared ones."""
    B, T, _ = x.shape
    out = torch.zeros_like(x)
    for b in range(B):
        for t in range(T):
            x_t = x[b, t]
            chosen, s = reference_choice(moe, x_t)
            w = reference_weights(moe, s, chosen)
            y = sum(w[j] * expert_ffn(moe, e, x_t) for j, e in enumerate(chosen))
            if moe.shared is not None:
                y = y + moe.shared(x_t)
            out[b, t] = y
    return out


ROUTING_CASES = [
    dict(),                                                                   # no groups
    dict(n_expert_groups=4, n_limited_groups=1),                              # 2 experts/group: max score
    dict(n_routed_experts=12, n_activated_experts=3, n_expert_groups=3, n_limited_groups=1),  # top-2 sum
]


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax", "sqrtsoftplus"])
@pytest.mark.parametrize("routing", ROUTING_CASES)
def test_matches_per_token_reference(score_func, routing):
    moe = make_moe(score_func=score_func, route_scale=2.5, **routing)
    with torch.no_grad():
        moe.expert_bias.normal_(0, 0.05)  # a non-trivial bias must also be honoured
    x = torch.randn(2, 7, DIM)
    with torch.no_grad():
        y = moe(x)
        y_ref = reference_forward(moe, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    if moe.cfg.n_expert_groups > 1:
        # the group limit must actually matter on this input, or the test could not catch its absence
        tokens = x.view(-1, DIM)
        differs = [reference_choice(moe, t)[0] != reference_choice(moe, t, use_groups=False)[0] for t in tokens]
        assert any(differs)


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax", "sqrtsoftplus"])
def test_bias_changes_choice_not_weight_formula(score_func):
    moe = make_moe(score_func=score_func, route_scale=1.7)
    x = torch.randn(32, DIM)
    scores = router_scores(moe.gate(x), score_func).detach()  # (N, E)
    _, ids_plain = route(scores, moe.expert_bias, moe.cfg)
    favoured = 5
    assert (ids_plain != favoured).all(dim=-1).any(), "need tokens that do not pick expert 5 unbiased"
    bias = torch.zeros(8)
    bias[favoured] = 10.0
    weights, ids = route(scores, bias, moe.cfg)
    assert (ids == favoured).any(dim=-1).all(), "a large bias must put expert 5 in every token's top-k"
    assert not torch.equal(ids.sort(-1).values, ids_plain.sort(-1).values)
    # the weights use the unbiased scores of the chosen experts, with the usual formula
    chosen = scores.gather(1, ids)
    expected = chosen / chosen.sum(-1, keepdim=True) if score_func != "softmax" else chosen
    torch.testing.assert_close(weights, expected * 1.7)
    # and the whole layer agrees with the per-token reference under this bias
    moe.expert_bias.copy_(bias)
    with torch.no_grad():
        torch.testing.assert_close(moe(x[None]), reference_forward(moe, x[None]), atol=1e-5, rtol=1e-5)


def test_bias_updates_balance_a_skewed_router():
    moe = make_moe(n_routed_experts=8, n_activated_experts=2, bias_update_speed=0.01)
    direction = torch.randn(DIM)
    direction = direction / direction.norm()
    with torch.no_grad():
        moe.gate.weight[0] = 3.0 * direction  # expert 0 wins on most inputs, which share this component
    moe.train()
    gen = torch.Generator().manual_seed(1)

    def batch():
        return torch.randn(4, 32, DIM, generator=gen) + direction

    ratios = []
    with torch.no_grad():
        for _ in range(100):
            moe(batch())
            ratios.append(moe.update_bias()["max_over_mean"])
    before = ratios[0]
    after = sum(ratios[-10:]) / 10
    assert before > 2.5, f"the router should start skewed, got max/mean {before:.2f}"
    assert after < 0.5 * before, f"max/mean {before:.2f} -> {after:.2f}"
    assert moe.expert_bias[0] < 0  # the overloaded expert was pushed down


def test_gradients_reach_router_and_all_experts():
    moe = make_moe(aux_loss_alpha=0.0)
    moe.train()
    x = torch.randn(2, 16, DIM)
    moe(x).pow(2).sum().backward()
    for name in ["gate.weight", "w1", "w3", "w2", "shared.w1.weight", "shared.w3.weight", "shared.w2.weight"]:
        grad = moe.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert moe.expert_bias.grad is None and not moe.expert_bias.requires_grad


def test_shared_experts_always_contribute():
    moe = make_moe(n_shared_experts=2)
    x = torch.randn(2, 9, DIM)
    with torch.no_grad():
        y = moe(x)
        moe.shared.w2.weight.zero_()
        y_without_shared = moe(x)
    assert ((y - y_without_shared).abs().amax(-1) > 0).all()


def test_no_shared_experts():
    moe = make_moe(n_shared_experts=0)
    assert moe.shared is None
    x = torch.randn(1, 5, DIM)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), reference_forward(moe, x), atol=1e-5, rtol=1e-5)


def test_expert_bias_is_saved_and_counts_are_not():
    moe = make_moe()
    state = moe.state_dict()
    assert "expert_bias" in state and "expert_load" not in state
    assert "expert_bias" not in dict(moe.named_parameters())
    with torch.no_grad():
        moe.expert_bias.normal_()
    other = make_moe(seed=1)
    other.load_state_dict(moe.state_dict())
    torch.testing.assert_close(other.expert_bias, moe.expert_bias)


def test_bias_unchanged_when_gamma_is_zero():
    moe = make_moe(bias_update_speed=0.0)
    moe.train()
    with torch.no_grad():
        moe(torch.randn(2, 16, DIM))
    stats = moe.update_bias()
    assert torch.equal(moe.expert_bias, torch.zeros(8))
    assert set(stats) == {"max_over_mean", "min_over_mean", "cv"}
    assert moe.expert_load.sum() == 0  # counts were reset


def test_counts_only_in_training_and_update_is_noop_without_counts():
    moe = make_moe(bias_update_speed=0.1)
    moe.eval()
    with torch.no_grad():
        moe(torch.randn(2, 16, DIM))
    assert moe.expert_load.sum() == 0
    assert moe.update_bias() == {}
    assert torch.equal(moe.expert_bias, torch.zeros(8))
    moe.train()
    with torch.no_grad():
        moe(torch.randn(2, 16, DIM))
    assert moe.expert_load.sum() == 2 * 16 * 2  # every token counted k times
    load = moe.expert_load.clone()
    moe.update_bias()
    # overloaded experts go down by gamma, underloaded up by gamma
    expected = 0.1 * torch.sign(load.mean() - load)
    torch.testing.assert_close(moe.expert_bias, expected)


def test_sequence_aux_loss_matches_formula_and_is_differentiable():
    moe = make_moe(aux_loss_alpha=0.01)
    moe.train()
    B, T, E, k = 3, 10, 8, 2
    x = torch.randn(B, T, DIM)
    moe(x)
    aux = moe.aux_loss
    assert aux.dim() == 0 and aux.item() > 0 and aux.requires_grad
    aux.backward()
    assert moe.gate.weight.grad.abs().sum() > 0
    # DeepSeek-V3 eq. 17-20, one sequence at a time
    expected = 0.0
    with torch.no_grad():
        for b in range(B):
            f = torch.zeros(E)
            P = torch.zeros(E)
            for t in range(T):
                chosen, s = reference_choice(moe, x[b, t])
                f[chosen] += E / (k * T)
                P += s / s.sum() / T
            expected += 0.01 * (f * P).sum().item() / B
    assert abs(aux.item() - expected) < 1e-6
    moe.eval()
    moe(x)
    assert moe.aux_loss.item() == 0.0


def test_aux_loss_zero_when_alpha_zero():
    moe = make_moe(aux_loss_alpha=0.0)
    moe.train()
    moe(torch.randn(2, 4, DIM))
    assert moe.aux_loss.item() == 0.0


def test_idle_experts_are_fine():
    moe = make_moe()
    with torch.no_grad():
        moe.expert_bias[[2, 6]] = 10.0  # every token picks exactly experts 2 and 6
    moe.train()
    x = torch.randn(2, 6, DIM)
    y = moe(x)
    assert torch.equal(moe.expert_load.nonzero().flatten(), torch.tensor([2, 6]))
    with torch.no_grad():
        torch.testing.assert_close(y, reference_forward(moe, x), atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert moe.w1.grad[[0, 1, 3, 4, 5, 7]].abs().sum() == 0  # idle experts get zero gradient
    assert moe.w1.grad[[2, 6]].abs().sum() > 0
    stats = moe.update_bias()
    assert stats["min_over_mean"] == 0.0
    # a single token also works
    with torch.no_grad():
        torch.testing.assert_close(moe(x[:1, :1]), reference_forward(moe, x[:1, :1]), atol=1e-5, rtol=1e-5)


def test_grouped_swiglu_with_empty_segments():
    torch.manual_seed(0)
    E, inter = 4, 8
    w1, w3, w2 = torch.randn(E, inter, DIM), torch.randn(E, inter, DIM), torch.randn(E, DIM, inter)
    counts = torch.tensor([0, 3, 0, 2])
    x_sorted = torch.randn(5, DIM)
    y = grouped_swiglu(x_sorted, counts, w1, w3, w2)
    expert_of_row = [1, 1, 1, 3, 3]
    for r, e in enumerate(expert_of_row):
        ref = w2[e] @ (F.silu(w1[e] @ x_sorted[r]) * (w3[e] @ x_sorted[r]))
        torch.testing.assert_close(y[r], ref, atol=1e-5, rtol=1e-5)
    assert grouped_swiglu(x_sorted[:0], torch.zeros(E, dtype=torch.long), w1, w3, w2).shape == (0, DIM)


def test_n_inactive_params():
    moe = make_moe(n_routed_experts=8, n_activated_experts=2, moe_inter_dim=8)
    routed = moe.w1.numel() + moe.w2.numel() + moe.w3.numel()
    assert moe.n_inactive_params() == routed * 6 // 8 == 6 * 3 * 8 * DIM


def test_dispatch_to_experts_matches_a_loop_over_tokens():
    """Given each token's experts and weights: sum_j w_j FFN_{e_j}(x_t) for every token, the weights'
    gradient (the router learns through it), and each expert's count of (token, choice) pairs."""
    from moe import dispatch_to_experts
    moe = make_moe()
    x = torch.randn(7, DIM)
    expert_ids = torch.tensor([[3, 0], [3, 5], [0, 3], [5, 3], [3, 0], [7, 5], [0, 7]])  # 1, 2, 4, 6 idle
    weights = torch.rand(7, 2, requires_grad=True)
    y, counts = dispatch_to_experts(x, expert_ids, weights, moe.w1, moe.w3, moe.w2)
    y.sum().backward()
    with torch.no_grad():
        outs = [[expert_ffn(moe, int(e), x[t]) for e in expert_ids[t]] for t in range(7)]  # FFN_{e_j}(x_t)
        expected = torch.stack([weights[t, 0] * outs[t][0] + weights[t, 1] * outs[t][1] for t in range(7)])
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(weights.grad, torch.tensor([[o.sum() for o in row] for row in outs]),
                                   atol=1e-5, rtol=1e-5)
    assert counts.tolist() == [4, 0, 0, 5, 0, 3, 0, 2]


def test_update_bias_moves_each_expert_against_its_load():
    """b_i += gamma * sign(mean - load_i) from the counted load (an expert at the mean keeps its bias), the
    load statistics, and the counts reset; with nothing counted, no step and no statistics."""
    moe = make_moe(bias_update_speed=0.1)
    moe.expert_load.copy_(torch.tensor([6.0, 3.0, 2.0, 1.0, 0.0, 4.0, 4.0, 4.0]))  # 24 tokens, mean 3
    stats = moe.update_bias()
    torch.testing.assert_close(moe.expert_bias, 0.1 * torch.tensor([-1.0, 0.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0]))
    assert stats == pytest.approx({"max_over_mean": 2.0, "min_over_mean": 0.0, "cv": (26 / 8) ** 0.5 / 3})
    assert moe.expert_load.sum() == 0
    bias = moe.expert_bias.clone()
    assert moe.update_bias() == {} and torch.equal(moe.expert_bias, bias)
