"""Multi-head Latent Attention (DeepSeek-V2 §2.1, DeepSeek-V3 §2.1).

Also home of the rotary position helpers, which both MLA and the plain
multi-head attention in model.py use.

MLA compresses each token's keys and values into one small latent vector
c^KV (size d_c = kv_lora_rank) plus one rotary key k^R (size d_h^R) shared by
all heads. At inference only those d_c + d_h^R numbers per token are cached,
instead of 2 * n_heads * head_dim for multi-head attention.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli  # check_numbers: the checks every config's numbers get
import kernels  # on a GPU, the one-token absorbed decode in a Triton split-KV kernel (use_triton decides)


# -----------------------------------------------------------------------------
# Rotary position embeddings


def rope_cos_sin(positions, dim, theta=10000.0):
    """cos/sin tables for rotary embeddings (Su et al., RoFormer).

    positions: (T,) integer positions. Returns cos, sin of shape (T, dim // 2).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x[..., i], x[..., i + D/2]) by the angle of each position.

    x: (B, T, H, D); cos, sin: (T, D/2). The "rotate half" layout (GPT-NeoX);
    computed in float32 at least for accuracy (float64 stays, for gradcheck), returned in x's dtype.
    """
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)  # (B, T, H, D/2) each
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


# -----------------------------------------------------------------------------
# Multi-head Latent Attention


@dataclass
class MLAConfig:
    q_lora_rank: int = 0          # 0 = plain query projection (d_c' in DeepSeek-V2)
    kv_lora_rank: int = 64        # d_c, compressed KV latent
    qk_nope_head_dim: int = 32    # d_h
    qk_rope_head_dim: int = 16    # d_h^R, decoupled rotary key shared by all heads
    v_head_dim: int = 32           # d_h of the values

    def __post_init__(self):
        cli.check_numbers(self, at_least_1=("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"), nonneg=("q_lora_rank",))
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim < 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even and >= 2 (RoPE rotates pairs)")


class MLA(nn.Module):
    """Multi-head Latent Attention with decoupled RoPE (DeepSeek-V2 eqs. 9-19).

    Training / prefill: per-head K and V are materialised from the latent and
    fed to scaled_dot_product_attention. Decoding with a filled cache: the
    "absorbed" form, which attends directly over the cached latents.
    """

    def __init__(self, dim: int, n_heads: int, cfg: MLAConfig, rope_theta: float = 10000.0):
        super().__init__()
        self.n_heads = n_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.rope_theta = rope_theta
        qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        # the score is a dot product over the full query-key head dim (d_h + d_h^R)
        self.softmax_scale = qk_head_dim ** -0.5

        # queries (eqs. 12-13, 15): optionally through a low-rank bottleneck c^Q
        if cfg.q_lora_rank == 0:
            self.wq = nn.Linear(dim, n_heads * qk_head_dim, bias=False)  # W^Q and W^QR in one
        else:
            self.wq_a = nn.Linear(dim, cfg.q_lora_rank, bias=False)  # W^DQ
            self.q_norm = nn.RMSNorm(cfg.q_lora_rank)
            self.wq_b = nn.Linear(cfg.q_lora_rank, n_heads * qk_head_dim, bias=False)  # W^UQ and W^QR in one

        # keys and values (eqs. 9-11, 14): one down-projection gives the latent c^KV
        # and the shared rotary key k^R side by side
        self.wkv_a = nn.Linear(dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)  # W^DKV and W^KR
        self.kv_norm = nn.RMSNorm(cfg.kv_lora_rank)
        # up-projection of the latent to every head's key (W^UK) and value (W^UV)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(n_heads * cfg.v_head_dim, dim, bias=False)  # W^O

    def cache_numbers_per_token(self) -> int:
        """Numbers this layer caches per token: the latent c^KV and the rotary key k^R."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def forward(self, x, cache: dict | None = None, start_pos: int = 0, value_embed=None):  # (B, T, dim) -> (B, T, dim)
        # value_embed (B, T, H, d_v): added to each head's value after W^UV (model.ValueEmbedding; off by default).
        # The absorbed decode cannot fold it into the latent, so a cache then keeps it too: H * d_v more numbers a token
        B, T, _ = x.shape
        H = self.n_heads
        positions = torch.arange(start_pos, start_pos + T, device=x.device)
        cos, sin = rope_cos_sin(positions, self.qk_rope_head_dim, self.rope_theta)  # (T, d_h^R/2)

        # queries: a position-free part and a rotary part per head
        if self.q_lora_rank == 0:
            q = self.wq(x)
        else:
            q = self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, T, H, self.qk_nope_head_dim + self.qk_rope_head_dim)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)  # (B, T, H, d_h^R)

        # the per-token state: normalised latent and one rotary key shared by all heads
        kv_latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv_latent = self.kv_norm(kv_latent)  # (B, T, d_c)
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin).squeeze(2)  # (B, T, d_h^R), treated as one head

        if cache is None or len(cache) == 0:
            if cache is not None:  # prefill: start the cache with only the compressed state
                cache["kv_latent"] = kv_latent.to(k_rope.dtype)  # one dtype for the cache (autocast)
                cache["k_rope"] = k_rope
                if value_embed is not None:
                    cache["value_embed"] = value_embed
            y = self._attend_materialised(q_nope, q_rope, kv_latent, k_rope, value_embed)
        else:
            assert cache["kv_latent"].size(1) == start_pos, "start_pos must equal the number of cached tokens"
            cache["kv_latent"] = torch.cat([cache["kv_latent"], kv_latent.to(k_rope.dtype)], dim=1)  # (B, S, d_c)
            cache["k_rope"] = torch.cat([cache["k_rope"], k_rope], dim=1)  # (B, S, d_h^R)
            if value_embed is not None:
                cache["value_embed"] = torch.cat([cache["value_embed"], value_embed], dim=1)  # (B, S, H, d_v)
            y = self._attend_absorbed(q_nope, q_rope, cache["kv_latent"], cache["k_rope"], start_pos,
                                      cache.get("value_embed"))
        return self.wo(y.flatten(2))  # (B, T, H * d_v) -> (B, T, dim)

    def _attend_materialised(self, q_nope, q_rope, kv_latent, k_rope, value_embed=None):
        """Causal attention among the T tokens of x, with explicit per-head K and V."""
        B, T, H, _ = q_nope.shape
        kv = self.wkv_b(kv_latent).view(B, T, H, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)  # (B, T, H, d_h), (B, T, H, d_v)
        if value_embed is not None:
            v = v + value_embed
        # decoupled RoPE (eq. 17): each head's key is [k^C_h ; k^R], k^R the same for all heads
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(B, T, H, self.qk_rope_head_dim)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, T, H, d_h + d_h^R)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.softmax_scale
        )  # (B, H, T, d_v)
        return y.transpose(1, 2)  # (B, T, H, d_v)

    def _attend_absorbed(self, q_nope, q_rope, kv_latent, k_rope, start_pos, value_embed=None):
        """T new queries attend over all S cached tokens, working in latent space.

        With W^UK_h (d_h, d_c) and W^UV_h (d_v, d_c) the slices of wkv_b for head h,
        key and value of cached token s are k_h,s = W^UK_h c_s and v_h,s = W^UV_h c_s. So
            q_h . k_h,s = (W^UK_h^T q_h) . c_s          (fold W^UK into the query)
            sum_s p_s v_h,s = W^UV_h (sum_s p_s c_s)    (fold W^UV into the output)
        Both products only need c_s, which is shared by all heads; the rotary part
        q^R_h . k^R_s needs k^R_s, also shared. Hence a token's cache is just
        d_c + d_h^R numbers, and per-head K and V are never formed (DeepSeek-V2 §2.1.2).
        """
        H = q_nope.shape[2]
        w = self.wkv_b.weight.view(H, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)  # (H, d_h, d_c), (H, d_v, d_c)
        q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # (B, T, H, d_c)
        if value_embed is None:
            y_latent = latent_attention(q_latent, q_rope, kv_latent, k_rope, self.softmax_scale, start_pos)
            return torch.einsum("bthc,hdc->bthd", y_latent, w_uv)  # (B, T, H, d_v)
        y_latent, y_embed = latent_attention(q_latent, q_rope, kv_latent, k_rope, self.softmax_scale, start_pos,
                                             value_embed)  # value embeddings: sum_s p_s ve_h,s on top
        return torch.einsum("bthc,hdc->bthd", y_latent, w_uv) + y_embed  # (B, T, H, d_v)


def latent_attention(q_latent, q_rope, kv_latent, k_rope, softmax_scale, start_pos=0, head_values=None):
    """Attention in latent space: T new queries, the new token i at absolute position start_pos + i, over
    the S cached tokens s <= start_pos + i. q_latent (B, T, H, d_c) (W^UK folded in), q_rope (B, T, H, d_h^R);
    kv_latent (B, S, d_c), k_rope (B, S, d_h^R): the cache, new tokens included. Returns the attention-weighted
    latent (B, T, H, d_c), before W^UV. One new token sees the whole cache; on a GPU that case runs in a
    split-KV Triton kernel (kernels.mla_decode_attention, FlashMLA's idea). With head_values (B, S, H, d_v),
    per-head values that W^UV does not make (value embeddings), also returns their weighted sum (B, T, H, d_v)."""
    B, T, H, _ = q_latent.shape
    S = kv_latent.size(1)
    if T == 1 and head_values is None and kernels.use_triton(kv_latent.device, "mla_decode_attention", kv_latent.dtype):
        dtype = kv_latent.dtype  # the kernel takes one dtype: the cache's
        return kernels.mla_decode_attention(q_latent[:, 0].to(dtype), q_rope[:, 0].to(dtype), kv_latent, k_rope,
                                            softmax_scale)[:, None]  # (B, 1, H, d_c)
    scores = torch.einsum("bthc,bsc->bhts", q_latent, kv_latent)  # (B, H, T, S)  q^C . c_s
    scores = scores + torch.einsum("bthr,bsr->bhts", q_rope, k_rope)  # + q^R . k^R_s
    scores = scores * softmax_scale
    # new token i sits at absolute position start_pos + i: it sees cached tokens s <= start_pos + i
    query_pos = torch.arange(start_pos, start_pos + T, device=scores.device)
    visible = torch.arange(S, device=scores.device)[None, :] <= query_pos[:, None]  # (T, S)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(kv_latent.dtype)
    y_latent = torch.einsum("bhts,bsc->bthc", probs, kv_latent)  # (B, T, H, d_c)
    if head_values is None:
        return y_latent
    return y_latent, torch.einsum("bhts,bshd->bthd", probs.to(head_values.dtype), head_values)
