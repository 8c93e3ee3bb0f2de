"""Parity with transformers' DeepSeek modules (a test-only dependency: no project script imports it).

Each test builds a tiny config of both sides, copies our weights into theirs with one helper per module
(*_weights_to_hf) and compares in float32:
    mla.MLA                          DeepseekV3Attention          models/deepseek_v3/modeling_deepseek_v3.py
    moe.MoE                          DeepseekV3MoE                (same file)
    moe.route, --score_func=sqrtsoftplus   DeepseekV4TopKRouter   models/deepseek_v4/modeling_deepseek_v4.py
    mhc.HyperConnection              DeepseekV4HyperConnection    (same file)
    mhc.StreamCollapse (dynamic)     DeepseekV4HyperHead          (same file)
Written against transformers 5.23.0; a class another version lacks is a skip that names it."""
import importlib

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="the parity tests compare against transformers (pip install transformers==5.23.0)")

from mhc import HyperConnection, MHCConfig, StreamCollapse  # noqa: E402
from moe import route, router_scores  # noqa: E402
from test_mla import decode_in_chunks, make_mla  # noqa: E402
from test_moe import make_moe  # noqa: E402

# float32 throughout. Outputs: max abs difference 1e-6 and relative 1e-5 (assert_close: |a - b| <= atol +
# rtol |b|); the sums and matmuls are the same math in another order, so what is left is float32 rounding.
ATOL, RTOL = 1e-6, 1e-5
NORM_EPS = torch.finfo(torch.float32).eps  # our RMSNorms' eps (nn.RMSNorm's default); transformers uses 1e-6


def close(ours, theirs):
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)


def hf(model, name):
    """transformers.models.<model>.modeling_<model>.<name> (configs are imported there too), or a skip."""
    try:
        module = importlib.import_module(f"transformers.models.{model}.modeling_{model}")
    except ImportError as e:
        pytest.skip(f"transformers {transformers.__version__} has no models.{model} ({e})")
    if not hasattr(module, name):
        pytest.skip(f"transformers {transformers.__version__} has no {name} (written against 5.23.0)")
    return getattr(module, name)


def hf_config(model, config_class, **kw):
    """A tiny config; eager attention and experts: the plain PyTorch loops, nothing fused."""
    config = hf(model, config_class)(**kw)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    return config


def by_expert(weights, expert_ids):
    """(N, k) weights and ids -> both sorted by expert id: transformers' top-k is unsorted (sorted=False)."""
    ids, order = expert_ids.sort(dim=-1)
    return weights.gather(-1, order), ids


# ----------------------------------------------------------------------------- MLA: DeepseekV3Attention

def rope_rows(d_rope, interleave):
    """Which of our rotary rows each of theirs holds. Ours rotate the pairs (i, i + d/2) ("rotate half");
    with rope_interleave, theirs rotate the pairs (2i, 2i + 1), DeepSeek's checkpoint layout, and write the
    result back half-split. So their row 2i is our row i and their row 2i + 1 our row i + d/2; after the
    rotation both layouts agree, the cached rotary keys included."""
    half = torch.arange(d_rope // 2)
    return torch.stack([half, half + d_rope // 2], dim=1).flatten() if interleave else torch.arange(d_rope)


def mla_weights_to_hf(ours, theirs, interleave):
    """Copy mla.MLA's weights into a DeepseekV3Attention, permuting the rotary rows (rope_rows)."""
    H, dn, dr, dc = ours.n_heads, ours.qk_nope_head_dim, ours.qk_rope_head_dim, ours.kv_lora_rank
    q_rows = torch.cat([torch.arange(dn), dn + rope_rows(dr, interleave)])  # within each head's dn + dr rows
    q_rows = (torch.arange(H)[:, None] * (dn + dr) + q_rows).flatten()
    kv_rows = torch.cat([torch.arange(dc), dc + rope_rows(dr, interleave)])  # the latent, then k^R
    with torch.no_grad():
        if ours.q_lora_rank == 0:
            theirs.q_proj.weight.copy_(ours.wq.weight[q_rows])
        else:
            theirs.q_a_proj.weight.copy_(ours.wq_a.weight)
            theirs.q_a_layernorm.weight.copy_(ours.q_norm.weight)
            theirs.q_b_proj.weight.copy_(ours.wq_b.weight[q_rows])
        theirs.kv_a_proj_with_mqa.weight.copy_(ours.wkv_a.weight[kv_rows])
        theirs.kv_a_layernorm.weight.copy_(ours.kv_norm.weight)
        theirs.kv_b_proj.weight.copy_(ours.wkv_b.weight)
        theirs.o_proj.weight.copy_(ours.wo.weight)


def mla_pair(q_lora_rank, interleave):
    """test_mla's tiny MLA (norm gains away from 1) and a DeepseekV3Attention with the same weights."""
    ours = make_mla(q_lora_rank)
    config = hf_config(
        "deepseek_v3", "DeepseekV3Config", hidden_size=ours.wo.out_features, num_attention_heads=ours.n_heads,
        num_key_value_heads=ours.n_heads, q_lora_rank=q_lora_rank or None, kv_lora_rank=ours.kv_lora_rank,
        qk_nope_head_dim=ours.qk_nope_head_dim, qk_rope_head_dim=ours.qk_rope_head_dim,
        v_head_dim=ours.v_head_dim, rope_interleave=interleave, max_position_embeddings=64,
        # plain RoPE: with rope_scaling (yarn) V3 would also scale the softmax by mscale^2
        rope_parameters={"rope_type": "default", "rope_theta": ours.rope_theta})
    theirs = hf("deepseek_v3", "DeepseekV3Attention")(config, layer_idx=0).eval()
    mla_weights_to_hf(ours, theirs, interleave)
    for norm in (theirs.q_a_layernorm, theirs.kv_a_layernorm):
        if norm is not None:  # the one constant that differs: their RMSNorm eps is 1e-6, ours float32's eps
            norm.variance_epsilon = NORM_EPS
    assert theirs.scaling == ours.softmax_scale  # 1 / sqrt(d_h + d_h^R), no mscale
    return ours, theirs, hf("deepseek_v3", "DeepseekV3RotaryEmbedding")(config)


def hf_attention(theirs, rope, x, start_pos=0, cache=None):
    """DeepseekV3Attention on x (B, T, C), the tokens at start_pos..start_pos + T - 1, with an explicit mask:
    new token i sees every key at position <= start_pos + i (what our MLA does with its cache)."""
    T = x.shape[1]
    cos_sin = rope(x, torch.arange(start_pos, start_pos + T)[None])  # (1, T, d_h^R) each
    mask = torch.full((T, start_pos + T), float("-inf")).triu(start_pos + 1)[None, None]  # (1, 1, T, S)
    return theirs(x, position_embeddings=cos_sin, attention_mask=mask, past_key_values=cache)[0]


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_mla_matches_deepseek_v3_attention(q_lora_rank, interleave):
    ours, theirs, rope = mla_pair(q_lora_rank, interleave)
    x = torch.randn(2, 11, ours.wo.out_features)
    with torch.no_grad():
        close(ours(x), hf_attention(theirs, rope, x))


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_mla_cached_decoding_matches_deepseek_v3_with_a_dynamic_cache(q_lora_rank, interleave):
    """Prefill 5 tokens, then one token at a time (our absorbed one-token path) and a chunk of 3 (absorbed,
    causal within the chunk), against their DynamicCache: each step's output, and the caches themselves."""
    ours, theirs, rope = mla_pair(q_lora_rank, interleave)
    chunks = [5, 1, 1, 3, 1]
    x = torch.randn(2, sum(chunks), ours.wo.out_features)
    cache = hf("deepseek_v3", "DynamicCache")(config=theirs.config)
    with torch.no_grad():
        ours_out, ours_cache = decode_in_chunks(ours, x, chunks)
        theirs_out, pos = [], 0
        for n in chunks:
            theirs_out.append(hf_attention(theirs, rope, x[:, pos:pos + n], pos, cache))
            pos += n
    close(ours_out, torch.cat(theirs_out, dim=1))
    # both cache the normalised latent c^KV and the rotated k^R, theirs as one head: (B, 1, S, d)
    close(ours_cache["kv_latent"], cache.layers[0].keys[:, 0])
    close(ours_cache["k_rope"], cache.layers[0].values[:, 0])


# ----------------------------------------------------------------------------- MoE: DeepseekV3MoE

def router_weights_to_hf(ours, gate):
    """Our router (gate, expert_bias) into a DeepseekV3TopkRouter or DeepseekV4TopKRouter."""
    with torch.no_grad():
        gate.weight.copy_(ours.gate.weight)
        gate.e_score_correction_bias.copy_(ours.expert_bias)


def moe_weights_to_hf(ours, theirs):
    """Copy moe.MoE's weights into a DeepseekV3MoE. Their experts hold [gate; up] in one matrix; our
    n_shared_experts shared experts are one SwiGLU that wide, as is their shared MLP."""
    router_weights_to_hf(ours, theirs.gate)
    with torch.no_grad():
        theirs.experts.gate_up_proj.copy_(torch.cat([ours.w1, ours.w3], dim=1))  # (E, 2 * inter, dim)
        theirs.experts.down_proj.copy_(ours.w2)  # (E, dim, inter)
        theirs.shared_experts.gate_proj.weight.copy_(ours.shared.w1.weight)
        theirs.shared_experts.up_proj.weight.copy_(ours.shared.w3.weight)
        theirs.shared_experts.down_proj.weight.copy_(ours.shared.w2.weight)


def moe_with_bias(**cfg):
    """test_moe's tiny MoE with a selection bias that changes which experts win."""
    ours = make_moe(**cfg)
    with torch.no_grad():
        ours.expert_bias.normal_(0.0, 0.05)
    return ours


V3_ROUTING = [
    dict(n_expert_groups=1, n_limited_groups=1),  # no groups
    dict(n_expert_groups=3, n_limited_groups=1),  # 4 experts per group: a group's score is its top-2 sum
    dict(n_expert_groups=3, n_limited_groups=2),
]


@pytest.mark.parametrize("routing", V3_ROUTING)
def test_moe_matches_deepseek_v3_moe(routing):
    """The same experts chosen and the same output: sigmoid scores, e_score_correction_bias for the choice
    only, group-limited routing (n_group / topk_group), weights normalised (norm_topk_prob) and scaled
    (routed_scaling_factor), plus 2 shared experts. (With 2 experts per group ours scores a group by its
    max, V3 by the sum of both: they choose differently there, by design; moe.limit_to_best_groups.)"""
    ours = moe_with_bias(n_routed_experts=12, n_activated_experts=3, n_shared_experts=2, route_scale=2.5,
                         **routing).eval()
    c = ours.cfg
    config = hf_config("deepseek_v3", "DeepseekV3Config", hidden_size=ours.dim, n_routed_experts=c.n_routed_experts,
                       num_experts_per_tok=c.n_activated_experts, n_shared_experts=c.n_shared_experts,
                       moe_intermediate_size=c.moe_inter_dim, n_group=c.n_expert_groups,
                       topk_group=c.n_limited_groups, routed_scaling_factor=c.route_scale, norm_topk_prob=True)
    theirs = hf("deepseek_v3", "DeepseekV3MoE")(config).eval()
    moe_weights_to_hf(ours, theirs)
    x = torch.randn(4, 16, ours.dim)
    with torch.no_grad():
        weights, ids = route(router_scores(ours.gate(x.flatten(0, 1)), c.score_func), ours.expert_bias, c)
        _, their_weights, their_ids = theirs.gate(x)
        y, their_y = ours(x), theirs(x)
    (weights, ids), (their_weights, their_ids) = by_expert(weights, ids), by_expert(their_weights, their_ids)
    assert torch.equal(ids, their_ids)
    close(weights, their_weights)
    close(y, their_y)


# ----------------------------------------------------------------------------- the router: DeepseekV4TopKRouter

@pytest.mark.parametrize("score_func", ["sqrtsoftplus", "sigmoid"])
def test_router_matches_deepseek_v4_top_k_router(score_func):
    """The same experts and weights, the chosen scores normalised and scaled by routed_scaling_factor. V4's
    router has no expert groups; it would renormalise softmax's top-k too, where ours keeps them raw (as
    V2/V3), but in 5.23.0 it cannot be built with scoring_func='softmax' (ACT2FN has no 'softmax')."""
    ours = moe_with_bias(score_func=score_func, n_activated_experts=3, route_scale=1.5)
    c = ours.cfg
    config = hf_config("deepseek_v4", "DeepseekV4Config", hidden_size=ours.dim, n_routed_experts=c.n_routed_experts,
                       num_experts_per_tok=c.n_activated_experts, scoring_func=score_func,
                       routed_scaling_factor=c.route_scale)
    theirs = hf("deepseek_v4", "DeepseekV4TopKRouter")(config)
    router_weights_to_hf(ours, theirs)
    x = torch.randn(64, ours.dim)
    with torch.no_grad():
        weights, ids = route(router_scores(ours.gate(x), score_func), ours.expert_bias, c)
        _, their_weights, their_ids = theirs(x)
    (weights, ids), (their_weights, their_ids) = by_expert(weights, ids), by_expert(their_weights, their_ids)
    assert torch.equal(ids, their_ids)
    close(weights, their_weights)


# ----------------------------------------------------------------------------- mHC: DeepSeek-V4's HyperConnection, HyperHead

V4_CODE = dict(hc_sinkhorn_start="softmax", hc_pre_eps=True)  # where DeepSeek-V4's code puts hc_eps
N_STREAMS, WIDTH = 4, 16


def v4_config(cfg: MHCConfig):
    return hf_config("deepseek_v4", "DeepseekV4Config", hidden_size=WIDTH, hc_mult=cfg.hc_mult,
                     hc_sinkhorn_iters=cfg.hc_sinkhorn_iters, hc_eps=cfg.hc_eps, rms_norm_eps=NORM_EPS)


def hc_weights_to_hf(ours, theirs):
    """Copy a HyperConnection's phi, bias and scales into a DeepseekV4HyperConnection (fn, base, scale).
    V4 mixes the streams as comb^T x, ours as H_res x: its comb is our H_res transposed, so the n x n rows
    of phi and of the bias are transposed on the way."""
    n = ours.n
    rows = torch.arange(2 * n + n * n)  # pre (n), post (n), then H_res row-major (n x n)
    rows = torch.cat([rows[:2 * n], rows[2 * n:].view(n, n).t().flatten()])
    with torch.no_grad():
        theirs.fn.copy_(ours.phi.weight[rows])
        theirs.base.copy_(ours.bias[rows])
        theirs.scale.copy_(ours.scale)


def hc_pair(**options):
    """A hyper-connection moved away from its init (random phi, static maps and scales, as training would
    leave them) and a DeepseekV4HyperConnection with the same weights."""
    torch.manual_seed(0)
    cfg = MHCConfig(hc_mult=N_STREAMS, **options)
    ours = HyperConnection(WIDTH, cfg, sublayer=1)
    with torch.no_grad():
        ours.phi.weight.normal_(0.0, 0.1)
        ours.bias.normal_(0.0, 1.0)
        ours.scale.uniform_(0.5, 1.5)
    theirs = hf("deepseek_v4", "DeepseekV4HyperConnection")(v4_config(cfg))
    hc_weights_to_hf(ours, theirs)
    return ours, theirs


def test_mhc_with_v4_options_matches_deepseek_v4_hyper_connection():
    """H_post, H_res (their comb, transposed), the sublayer's input H_pre x and the write-back as V4's
    decoder layer does it: post y + comb^T x."""
    ours, theirs = hc_pair(**V4_CODE)
    x, y = torch.randn(2, 7, N_STREAMS, WIDTH), torch.randn(2, 7, WIDTH)
    with torch.no_grad():
        h, maps = ours.read(x)
        post, comb, collapsed = theirs(x)
        close(maps[0], post)
        close(maps[1], comb.transpose(-1, -2))
        close(h[:, :, 0], collapsed)
        close(ours.write(x, y, maps), post[..., None] * y[:, :, None] + comb.transpose(-1, -2) @ x)


def test_mhc_default_differs_from_deepseek_v4_only_by_where_eps_goes():
    """Our defaults (the paper's exp start, no eps on H_pre) against the same V4 module: the maps differ by
    about hc_eps = 1e-6, no more, and the read by hc_eps times the sum of the streams."""
    ours, theirs = hc_pair()
    x = torch.randn(2, 7, N_STREAMS, WIDTH)
    with torch.no_grad():
        h, (h_post, h_res) = ours.read(x)
        post, comb, collapsed = theirs(x)
    close(h_post, post)
    res_gap = (h_res - comb.transpose(-1, -2)).abs().max()
    assert 0 < res_gap < 1e-5, res_gap
    torch.testing.assert_close(h[:, :, 0] + ours.cfg.hc_eps * x.sum(dim=2), collapsed, atol=ATOL, rtol=RTOL)


def collapse_weights_to_hf(ours, theirs):
    """Copy a dynamic StreamCollapse's phi, bias and scale into a DeepseekV4HyperHead: the same layout."""
    with torch.no_grad():
        theirs.hc_fn.copy_(ours.phi.weight)  # (n, n * C)
        theirs.hc_base.copy_(ours.bias)
        theirs.hc_scale.copy_(ours.scale)


def test_dynamic_collapse_matches_deepseek_v4_hyper_head():
    """--hc_collapse=dynamic --hc_pre_eps=true: per-token weights sigmoid(a h + b) + eps, h from the
    normalised streams. (Our default, static weights, has no V4 counterpart.)"""
    torch.manual_seed(0)
    cfg = MHCConfig(hc_mult=N_STREAMS, hc_collapse="dynamic", hc_pre_eps=True)
    ours = StreamCollapse(N_STREAMS, WIDTH, cfg)
    with torch.no_grad():
        ours.phi.weight.normal_(0.0, 0.1)
        ours.bias.normal_(0.0, 1.0)
        ours.scale.fill_(0.7)
    theirs = hf("deepseek_v4", "DeepseekV4HyperHead")(v4_config(cfg))
    collapse_weights_to_hf(ours, theirs)
    x = torch.randn(2, 7, N_STREAMS, WIDTH)
    with torch.no_grad():
        close(ours(x), theirs(x))
