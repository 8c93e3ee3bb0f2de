"""Triton kernels for nano-engram's three hot spots, and the one switch that picks them.

  1. engram_lookup          Engram's hash + gather of one layer, fused           (engram.lookup, paper §2.2-3)
  2. moe_grouped_swiglu     every routed expert's SwiGLU as grouped GEMMs         (moe.run_experts, DeepSeekMoE)
  3. mla_decode_attention   MLA's absorbed attention for one new token, split-KV  (mla.latent_attention, V2 §2.1.2)

The math each kernel computes is written plainly in the file named beside it, which runs it unless
use_triton(...) says the kernel applies (DeepSeek-V3's linear() pattern); the tests compare every kernel
with that reference. Each section reads as the Triton tutorials do: the idea and its memory traffic, the
pseudo-code, the tile table, the kernels, the autograd Function, the public op. Section 4 is the switch.
TRITON_INTERPRET=1 runs the kernels on the CPU in Triton's interpreter (the tests do; set it before this
file is imported). This file imports nothing from the project and works without triton installed.
"""
import functools
import math
import os
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # the kernels below are still defined, so the file reads the same, but never launched
    HAVE_TRITON = False
    triton = SimpleNamespace(jit=lambda fn: fn, autotune=lambda **_: (lambda fn: fn),
                             Config=lambda *_, **__: None, cdiv=lambda a, b: -(-a // b))
    tl = SimpleNamespace(constexpr=None)  # only the kernels' annotations read it

# whether the kernels below were built for the interpreter (fixed at import, as triton.jit does)
INTERPRET = HAVE_TRITON and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# -----------------------------------------------------------------------------
# 1. Engram fused lookup (paper §2.2): canonical ids -> every head's hash -> gathered rows
#
#   for each (block of BLOCK_T tokens t, head h):        one program, the hash in registers
#       mix = XOR_{j<n_h} c[t-j] * m[j]                  the <= max_order ids of t's N-gram
#       e[t, h's slice] = table[mix % p[h] + offset[h]]  one table for all heads
#
# Memory traffic: the ids once (8 B per token; the other heads' re-reads hit L2), the gathered rows
# (n_tokens * H * head_dim * elem) and as much again for the output (engram_lookup_bytes). The reference
# adds int64 passes (per order a (B, T) product and XOR, then (B, T, H) tensors for the modulo, the
# concatenation and the offset add, read back by the gather): some 7H int64 reads and writes per token,
# as many bytes as the rows themselves when a row is 32 bf16 values.
#
# Backward, with the rows recomputed from the ids. Dense: tl.atomic_add of each (token, head) gradient
# row into a float32 table gradient. Atomics, not sort-then-segment-sum, because conflicts are rare: a
# table has far more rows than a batch has (token, head) pairs; only frequent N-grams (", and") collect
# many additions, and those serialise in L2 at a cost far below sorting n_tokens * H int64 keys. The
# price: additions to one row land in no fixed order, so the gradient is reproducible to rounding only.
# Sparse (as F.embedding(sparse=True)): a kernel stores the (n_tokens, H) rows, and the gradient is the
# COO tensor (rows, grad_out as (n_tokens * H, head_dim)): nothing table-sized is allocated or written.

# Tile tables, one beside each kernel. The interpreter gains nothing from tuning: one config per kernel,
# with blocks small next to the tests' shapes so that they cross block edges. On a GPU the first configs
# suit sm90 (228 KB shared memory); the autotuner skips those that do not fit an older GPU.
if INTERPRET:
    ENGRAM_CONFIGS = [triton.Config({"BLOCK_T": 16}, num_warps=1)]
    ENGRAM_BACKWARD_BLOCK_T, ENGRAM_BACKWARD_WARPS = 16, 1
else:
    ENGRAM_CONFIGS = [
        triton.Config({"BLOCK_T": 64}, num_warps=2),
        triton.Config({"BLOCK_T": 128}, num_warps=4),
        triton.Config({"BLOCK_T": 256}, num_warps=8),
    ]
    ENGRAM_BACKWARD_BLOCK_T, ENGRAM_BACKWARD_WARPS = 128, 4


@triton.jit
def _engram_head_rows(context_ptr, multipliers_ptr, head_primes_ptr, head_offsets_ptr, head_orders_ptr,
                      tokens, token_mask, head, T, stride_context, MAX_ORDER: tl.constexpr):
    """Rows of one head for a block of flat token indices b*T + t: (BLOCK_T,) int64, as engram.hash_ngrams."""
    batch = tokens // T
    t = tokens % T
    order = tl.load(head_orders_ptr + head)  # n of this head's N-gram
    mix = tl.zeros_like(tokens)  # int64; XOR with 0 is the identity
    for j in tl.static_range(MAX_ORDER):
        # c_{t-j} sits at column (MAX_ORDER-1) + t - j of the left-padded context
        c = tl.load(context_ptr + batch * stride_context + (MAX_ORDER - 1 - j) + t, mask=token_mask, other=0)
        # beyond this head's n the multiplier is 0: a 0 term leaves the XOR unchanged
        m = tl.where(order > j, tl.load(multipliers_ptr + j), 0)
        mix = mix ^ (c * m)  # c * m < 2**62 (engram.hash_ngrams' bound): no int64 overflow
    return mix % tl.load(head_primes_ptr + head) + tl.load(head_offsets_ptr + head)


@triton.autotune(configs=ENGRAM_CONFIGS, key=["head_dim"])
@triton.jit
def _engram_lookup_kernel(context_ptr, multipliers_ptr, head_primes_ptr, head_offsets_ptr, head_orders_ptr,
                          table_ptr, out_ptr, n_tokens, T, head_dim, stride_context, stride_table, stride_out,
                          MAX_ORDER: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    head = tl.program_id(1)
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
    token_mask = tokens < n_tokens
    rows = _engram_head_rows(context_ptr, multipliers_ptr, head_primes_ptr, head_offsets_ptr, head_orders_ptr,
                             tokens, token_mask, head, T, stride_context, MAX_ORDER)
    cols = tl.arange(0, BLOCK_D)
    mask = token_mask[:, None] & (cols < head_dim)[None, :]  # (BLOCK_T, BLOCK_D)
    values = tl.load(table_ptr + rows[:, None] * stride_table + cols[None, :], mask=mask)
    # this head's slice of the concatenated memory vector (heads order-major, as the reference)
    tl.store(out_ptr + tokens[:, None] * stride_out + head * head_dim + cols[None, :], values, mask=mask)


@triton.jit
def _engram_lookup_backward_kernel(context_ptr, multipliers_ptr, head_primes_ptr, head_offsets_ptr,
                                   head_orders_ptr, grad_out_ptr, grad_table_ptr, n_tokens, T, head_dim,
                                   stride_context, stride_grad_out, stride_grad_table,
                                   MAX_ORDER: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    head = tl.program_id(1)
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < n_tokens
    rows = _engram_head_rows(context_ptr, multipliers_ptr, head_primes_ptr, head_offsets_ptr, head_orders_ptr,
                             tokens, token_mask, head, T, stride_context, MAX_ORDER)  # recomputed, not saved
    cols = tl.arange(0, BLOCK_D)
    mask = token_mask[:, None] & (cols < head_dim)[None, :]
    grad = tl.load(grad_out_ptr + tokens[:, None] * stride_grad_out + head * head_dim + cols[None, :],
                   mask=mask).to(tl.float32)
    # rows repeat (shared N-grams, the pad N-gram at every sequence start): add, don't store
    tl.atomic_add(grad_table_ptr + rows[:, None] * stride_grad_table + cols[None, :], grad, mask=mask,
                  sem="relaxed")


@triton.jit
def _engram_rows_kernel(context_ptr, multipliers_ptr, head_primes_ptr, head_offsets_ptr, head_orders_ptr,
                        rows_ptr, n_tokens, T, n_heads, stride_context, MAX_ORDER: tl.constexpr,
                        BLOCK_T: tl.constexpr):
    """The sparse backward's indices: rows (n_tokens, H) int64, as engram.hash_ngrams(...).view(-1, H)."""
    head = tl.program_id(1)
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < n_tokens
    rows = _engram_head_rows(context_ptr, multipliers_ptr, head_primes_ptr, head_offsets_ptr, head_orders_ptr,
                             tokens, token_mask, head, T, stride_context, MAX_ORDER)
    tl.store(rows_ptr + tokens * n_heads + head, rows, mask=token_mask)


@functools.lru_cache(maxsize=None)
def _head_orders(ngram_orders, heads_per_order, device):
    """(H,) int32 N of every head, order-major; cached so a decode step does no host-to-device copy."""
    return torch.tensor([n for n in ngram_orders for _ in range(heads_per_order)], dtype=torch.int32, device=device)


class _EngramLookup(torch.autograd.Function):
    """Fused hash + gather. Only the table gets a gradient (everything else is integer ids)."""

    @staticmethod
    def forward(ctx, table, context, multipliers, head_primes, head_offsets, head_orders, sparse):
        B, width = context.shape
        max_order = multipliers.numel()
        T = width - (max_order - 1)
        H, head_dim = head_primes.numel(), table.shape[1]
        table = table.contiguous()
        out = table.new_empty(B, T, H * head_dim)  # (B, T, d_mem)
        if B * T > 0:
            grid = lambda meta: (triton.cdiv(B * T, meta["BLOCK_T"]), H)  # noqa: E731
            _engram_lookup_kernel[grid](context, multipliers, head_primes, head_offsets, head_orders, table, out,
                                        B * T, T, head_dim, context.stride(0), table.stride(0), out.stride(1),
                                        MAX_ORDER=max_order, BLOCK_D=_pow2_at_least_16(head_dim))
        ctx.save_for_backward(context, multipliers, head_primes, head_offsets, head_orders)
        ctx.table_shape, ctx.table_dtype, ctx.sparse = table.shape, table.dtype, sparse
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ids = ctx.saved_tensors  # context, multipliers, head_primes, head_offsets, head_orders
        context, multipliers, head_primes = ids[:3]
        grad_out = grad_out.contiguous()  # (B, T, d_mem)
        B, T, _ = grad_out.shape
        H, head_dim = head_primes.numel(), ctx.table_shape[1]
        grid = (triton.cdiv(B * T, ENGRAM_BACKWARD_BLOCK_T), H)
        blocks = dict(MAX_ORDER=multipliers.numel(), BLOCK_T=ENGRAM_BACKWARD_BLOCK_T, num_warps=ENGRAM_BACKWARD_WARPS)
        if ctx.sparse:
            rows = torch.empty(B * T, H, dtype=torch.long, device=grad_out.device)  # (B*T, H)
            if B * T > 0:
                _engram_rows_kernel[grid](*ids, rows, B * T, T, H, context.stride(0), **blocks)
            # heads are order-major in e_t, so gradient row token*H + head belongs to rows[token, head]
            values = grad_out.view(-1, head_dim).to(ctx.table_dtype)  # (B*T*H, head_dim)
            # every row is in range by construction (mod prime + offset): skip the invariant check
            grad_table = torch.sparse_coo_tensor(rows.view(1, -1), values, ctx.table_shape, check_invariants=False)
        else:
            # atomics accumulate in float32 even for a bf16 table, then one cast at the end
            grad_table = torch.zeros(ctx.table_shape, dtype=torch.float32, device=grad_out.device)
            if B * T > 0:
                _engram_lookup_backward_kernel[grid](*ids, grad_out, grad_table, B * T, T, head_dim, context.stride(0),
                                                     grad_out.stride(1), grad_table.stride(0),
                                                     BLOCK_D=_pow2_at_least_16(head_dim), **blocks)
            grad_table = grad_table.to(ctx.table_dtype)
        return grad_table, None, None, None, None, None, None


def engram_lookup(context, multipliers, head_primes, head_offsets, ngram_orders, heads_per_order, table,
                  sparse=False):
    """engram.lookup in one kernel: e_t of ONE Engram layer straight from canonical ids, (B, T, H * head_dim),
    same arguments, same result (the hash fused with the gather)."""
    assert context.dtype == torch.long and context.dim() == 2, "context: (B, P+T) int64 canonical ids"
    assert multipliers.dim() == 1 and max(ngram_orders) <= multipliers.numel(), "multipliers: (max_order,) of one layer"
    assert head_primes.numel() == head_offsets.numel() == len(ngram_orders) * heads_per_order
    head_orders = _head_orders(tuple(ngram_orders), heads_per_order, table.device)
    return _EngramLookup.apply(table, context.contiguous(), multipliers.contiguous(), head_primes.contiguous(),
                               head_offsets.contiguous(), head_orders, sparse)


def engram_lookup_bytes(n_tokens: int, n_heads: int, head_dim: int, elem_bytes: int = 2) -> int:
    """Bytes the fused lookup must move: each token's id (int64), its H gathered rows and the output."""
    return n_tokens * 8 + 2 * n_tokens * n_heads * head_dim * elem_bytes


# -----------------------------------------------------------------------------
# 2. MoE grouped GEMM: every routed expert's SwiGLU in one launch per projection
#
# The reference (moe.expert_loop) loops over experts, three small matmuls each, after a host sync for the counts. With
# DeepSeek-style fine-grained experts (64, a few hundred rows each) those matmuls cannot fill a GPU and
# the launches dominate. A grouped GEMM runs all experts in one launch, however unevenly loaded:
#
#   tiles = grouped_tile_schedule(counts)        every expert's rows in BLOCK_M tiles, on the device
#   for each (tile of expert e, column block):   one program
#       out[tile, cols] = A[tile] @ B_e[:, cols]
#
#   forward   1 launch: gate = x W1_e^T, up = x W3_e^T, act = SiLU(gate) * up in the epilogue
#             1 launch: y = act W2_e^T
#   backward  1 launch: d_act = dy W2_e, through SwiGLU in the epilogue -> d_gate, d_up
#             1 launch: dx = d_gate W1_e + d_up W3_e
#             3 launches: dW2_e = dy_e^T act_e, dW1_e = d_gate_e^T x_e, dW3_e = d_up_e^T x_e, one
#             program per (expert, weight tile) summing over the expert's rows
#
# Memory traffic (forward): x read once per column block, each weight once per row tile (from L2 after
# the first), act and y written once; plus gate and up (M x inter each) when training. The reference
# writes and re-reads three (M x inter) intermediates per expert, plus the concatenation.
# FLOPs: 6 * M * dim * inter forward, twice that backward (moe_grouped_swiglu_flops).

if INTERPRET:
    GROUPED_BLOCK_M = 16
    GROUPED_CONFIGS = [triton.Config({"BLOCK_N": 32, "BLOCK_K": 16}, num_warps=1)]
    WEIGHT_GRAD_CONFIGS = [triton.Config({"BLOCK_P": 16, "BLOCK_Q": 32, "BLOCK_K": 16}, num_warps=1)]
else:
    GROUPED_BLOCK_M = 64  # rows per tile: fixed by the tile schedule; N, K blocks and pipelining are tuned
    GROUPED_CONFIGS = [
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    ]
    WEIGHT_GRAD_CONFIGS = [
        triton.Config({"BLOCK_P": 128, "BLOCK_Q": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_P": 64, "BLOCK_Q": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_P": 64, "BLOCK_Q": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    ]


def grouped_tile_schedule(counts, n_rows: int, block_m: int = GROUPED_BLOCK_M):
    """Which rows each program of a grouped GEMM works on, computed on the device (no host sync).

    counts (E,) rows per expert, the rows sorted by expert. Expert e owns rows
    [offsets[e], offsets[e+1]) and is cut into ceil(counts[e] / block_m) row tiles. The launch has an
    upper bound of cdiv(n_rows, block_m) + E tiles (known on the host without reading counts);
    tiles past the real ones get an empty row range and exit at once.
    Returns tile_expert, tile_row_start, tile_row_end (n_tiles,) int32 and offsets (E+1,) int32.
    """
    E = counts.numel()
    counts = counts.to(torch.int32)
    offsets = torch.zeros(E + 1, dtype=torch.int32, device=counts.device)
    offsets[1:] = counts.cumsum(0)
    tiles = (counts + block_m - 1) // block_m  # (E,) row tiles of each expert
    tiles_end = tiles.cumsum(0, dtype=torch.int32)  # (E,) one past each expert's last tile
    tile = torch.arange(triton.cdiv(n_rows, block_m) + E, dtype=torch.int32, device=counts.device)
    expert = torch.searchsorted(tiles_end, tile, right=True)  # (n_tiles,) E for the spare tiles
    expert = expert.clamp(max=E - 1)  # a spare tile then starts past the last row: an empty range
    row_start = offsets[expert] + (tile - (tiles_end - tiles)[expert]) * block_m
    row_end = offsets[expert + 1]
    return expert.to(torch.int32), row_start.to(torch.int32), row_end.to(torch.int32), offsets


@triton.jit
def _segment_tile_dot(a_ptr, b_ptr, rows, row_mask, cols, col_mask, N, K, TRANS_B: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      PRECISION: tl.constexpr):
    """One output tile A[rows] @ B: (BLOCK_M, BLOCK_N) float32.
    A is row-major (M, K); B is one expert's weight read as a (K, N) matrix: stored (N, K) when
    TRANS_B (x @ W^T, as nn.Linear) or (K, N) otherwise. Transposing is only a choice of strides."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TRANS_B:  # stored (N, K)
        stride_bk = 1
        stride_bn = K
    else:  # stored (K, N)
        stride_bk = N
        stride_bn = 1
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows[:, None] * K + k[None, :], mask=row_mask[:, None] & (k < K)[None, :], other=0.0)
        b = tl.load(b_ptr + k[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=(k < K)[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _tile_coords(tile_expert_ptr, tile_start_ptr, tile_end_ptr, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's expert, rows and columns, from the tile schedule (grouped_tile_schedule)."""
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    row_start, row_end = tl.load(tile_start_ptr + tile), tl.load(tile_end_ptr + tile)
    rows = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return expert, row_start, row_end, rows, rows < row_end, cols, cols < N


@triton.autotune(configs=GROUPED_CONFIGS, key=["N", "K"])
@triton.jit
def _grouped_swiglu_up_kernel(x_ptr, w1_ptr, w3_ptr, act_ptr, gate_ptr, up_ptr,
                              tile_expert_ptr, tile_start_ptr, tile_end_ptr, N, K,
                              SAVE_PREACT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """act = SiLU(x W1_e^T) * (x W3_e^T) for one (row tile of expert e, column block): N = inter, K = dim."""
    expert, row_start, row_end, rows, row_mask, cols, col_mask = _tile_coords(
        tile_expert_ptr, tile_start_ptr, tile_end_ptr, N, BLOCK_M, BLOCK_N)
    if row_start >= row_end:  # spare tile of the schedule
        return
    gate = _segment_tile_dot(x_ptr, w1_ptr + expert * N * K, rows, row_mask, cols, col_mask, N, K, True,
                             BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)  # (BLOCK_M, BLOCK_N) x W1^T
    up = _segment_tile_dot(x_ptr, w3_ptr + expert * N * K, rows, row_mask, cols, col_mask, N, K, True,
                           BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)  # x W3^T
    act = gate * tl.sigmoid(gate) * up  # SwiGLU in float32, rounded once
    offs = rows[:, None] * N + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(act_ptr + offs, act.to(act_ptr.dtype.element_ty), mask=mask)
    if SAVE_PREACT:  # the backward needs both pre-activations
        tl.store(gate_ptr + offs, gate.to(gate_ptr.dtype.element_ty), mask=mask)
        tl.store(up_ptr + offs, up.to(up_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=GROUPED_CONFIGS, key=["N", "K"])
@triton.jit
def _grouped_gemm_kernel(a_ptr, b_ptr, a2_ptr, b2_ptr, c_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
                         N, K, TRANS_B: tl.constexpr, HAS_SECOND: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[rows of e] = A[rows] @ B_e (+ A2[rows] @ B2_e): the generic grouped GEMM.
    Down projection: act @ W2_e^T. Input gradient: dgate @ W1_e + dup @ W3_e (HAS_SECOND)."""
    expert, row_start, row_end, rows, row_mask, cols, col_mask = _tile_coords(
        tile_expert_ptr, tile_start_ptr, tile_end_ptr, N, BLOCK_M, BLOCK_N)
    if row_start >= row_end:
        return
    acc = _segment_tile_dot(a_ptr, b_ptr + expert * N * K, rows, row_mask, cols, col_mask, N, K, TRANS_B,
                            BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    if HAS_SECOND:
        acc += _segment_tile_dot(a2_ptr, b2_ptr + expert * N * K, rows, row_mask, cols, col_mask, N, K, TRANS_B,
                                 BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.autotune(configs=GROUPED_CONFIGS, key=["N", "K"])
@triton.jit
def _grouped_swiglu_backward_kernel(grad_y_ptr, w2_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr,
                                    tile_expert_ptr, tile_start_ptr, tile_end_ptr, N, K,
                                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                    BLOCK_K: tl.constexpr):
    """d_act = dy @ W2_e (N = inter, K = dim), then through SwiGLU in the epilogue:
    d_up = d_act * SiLU(gate),  d_gate = d_act * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate)))."""
    expert, row_start, row_end, rows, row_mask, cols, col_mask = _tile_coords(
        tile_expert_ptr, tile_start_ptr, tile_end_ptr, N, BLOCK_M, BLOCK_N)
    if row_start >= row_end:
        return
    grad_act = _segment_tile_dot(grad_y_ptr, w2_ptr + expert * N * K, rows, row_mask, cols, col_mask, N, K,
                                 False, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    offs = rows[:, None] * N + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    gate = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    tl.store(grad_up_ptr + offs, (grad_act * gate * sig).to(grad_up_ptr.dtype.element_ty), mask=mask)
    grad_gate = grad_act * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(grad_gate_ptr + offs, grad_gate.to(grad_gate_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=WEIGHT_GRAD_CONFIGS, key=["P", "Q"])
@triton.jit
def _grouped_weight_grad_kernel(g_ptr, x_ptr, out_ptr, offsets_ptr, P, Q, PRECISION: tl.constexpr,
                                BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[e] = G[rows of e]^T @ X[rows of e]: (P, Q) per expert, the sum running over the expert's
    rows. One program per (expert, P block, Q block); an expert with no rows writes zeros."""
    expert = tl.program_id(0)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    q = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_start, row_end = tl.load(offsets_ptr + expert), tl.load(offsets_ptr + expert + 1)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_K):
        r = (r0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        r_mask = r < row_end
        g_t = tl.load(g_ptr + r[None, :] * P + p[:, None], mask=(p < P)[:, None] & r_mask[None, :], other=0.0)
        x = tl.load(x_ptr + r[:, None] * Q + q[None, :], mask=r_mask[:, None] & (q < Q)[None, :], other=0.0)
        acc = tl.dot(g_t, x, acc, input_precision=PRECISION)  # (BLOCK_P, BLOCK_K) @ (BLOCK_K, BLOCK_Q)
    tl.store(out_ptr + expert.to(tl.int64) * P * Q + p[:, None] * Q + q[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=(p < P)[:, None] & (q < Q)[None, :])


def _row_grid(n_tiles, N):
    return lambda meta: (n_tiles, triton.cdiv(N, meta["BLOCK_N"]))


def _weight_grad(g, x, offsets, like):
    """(E, P, Q) = per expert G_e^T X_e, for G (M, P), X (M, Q) sorted by expert."""
    E, P, Q = like.shape
    out = torch.empty_like(like)
    grid = lambda meta: (E, triton.cdiv(P, meta["BLOCK_P"]), triton.cdiv(Q, meta["BLOCK_Q"]))  # noqa: E731
    _grouped_weight_grad_kernel[grid](g, x, out, offsets, P, Q, PRECISION=_dot_precision(g.dtype))
    return out


def _grouped_swiglu_forward(x_sorted, schedule, w1, w3, w2, save_preact):
    """Two launches: act = SiLU(x W1_e^T) * (x W3_e^T), then y = act W2_e^T. Returns y (M, dim) and,
    if save_preact, act, gate, up (M, inter) for the backward (else None)."""
    M, dim = x_sorted.shape
    inter = w1.shape[1]
    n_tiles, precision = schedule[0].numel(), _dot_precision(x_sorted.dtype)
    act = x_sorted.new_empty(M, inter)  # (M, inter)
    gate = x_sorted.new_empty(M, inter) if save_preact else act  # pre-activations
    up = x_sorted.new_empty(M, inter) if save_preact else act
    _grouped_swiglu_up_kernel[_row_grid(n_tiles, inter)](
        x_sorted, w1, w3, act, gate, up, *schedule, inter, dim, SAVE_PREACT=save_preact, PRECISION=precision,
        BLOCK_M=GROUPED_BLOCK_M)
    y = x_sorted.new_empty(M, dim)  # (M, dim)
    _grouped_gemm_kernel[_row_grid(n_tiles, dim)](
        act, w2, act, w2, y, *schedule, dim, inter, TRANS_B=True, HAS_SECOND=False, PRECISION=precision,
        BLOCK_M=GROUPED_BLOCK_M)
    return (y, act, gate, up) if save_preact else (y, None, None, None)


class _GroupedSwiGLU(torch.autograd.Function):
    """moe.expert_loop as grouped GEMM launches, forward and backward."""

    @staticmethod
    def forward(ctx, x_sorted, counts, w1, w3, w2):
        tile_expert, tile_start, tile_end, offsets = grouped_tile_schedule(counts, x_sorted.shape[0])
        y, act, gate, up = _grouped_swiglu_forward(x_sorted, (tile_expert, tile_start, tile_end), w1, w3, w2,
                                                   save_preact=True)
        ctx.save_for_backward(x_sorted, w1, w3, w2, act, gate, up, tile_expert, tile_start, tile_end, offsets)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_sorted, w1, w3, w2, act, gate, up, tile_expert, tile_start, tile_end, offsets = ctx.saved_tensors
        schedule = (tile_expert, tile_start, tile_end)
        grad_y = grad_y.contiguous()  # (M, dim)
        M, dim = x_sorted.shape
        inter = w1.shape[1]
        n_tiles, precision = tile_expert.numel(), _dot_precision(grad_y.dtype)
        need_x, _, need_w1, need_w3, need_w2 = ctx.needs_input_grad
        grad_x = grad_w1 = grad_w3 = grad_w2 = None
        if need_w2:  # dW2_e = dy_e^T act_e  (dim, inter)
            grad_w2 = _weight_grad(grad_y, act, offsets, w2)
        if need_x or need_w1 or need_w3:
            grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)  # (M, inter)
            _grouped_swiglu_backward_kernel[_row_grid(n_tiles, inter)](
                grad_y, w2, gate, up, grad_gate, grad_up, *schedule, inter, dim, PRECISION=precision,
                BLOCK_M=GROUPED_BLOCK_M)
            if need_x:  # dx = dgate @ W1_e + dup @ W3_e  (M, dim), one launch
                grad_x = torch.empty_like(x_sorted)
                _grouped_gemm_kernel[_row_grid(n_tiles, dim)](
                    grad_gate, w1, grad_up, w3, grad_x, *schedule, dim, inter, TRANS_B=False, HAS_SECOND=True,
                    PRECISION=precision, BLOCK_M=GROUPED_BLOCK_M)
            if need_w1:  # dW1_e = dgate_e^T x_e  (inter, dim)
                grad_w1 = _weight_grad(grad_gate, x_sorted, offsets, w1)
            if need_w3:
                grad_w3 = _weight_grad(grad_up, x_sorted, offsets, w3)
        return grad_x, None, grad_w1, grad_w3, grad_w2


def moe_grouped_swiglu(x_sorted, counts, w1, w3, w2):
    """moe.expert_loop (same arguments, same result) with Triton grouped GEMMs: (M, dim).
    counts must be on the rows' device (no host sync) and sum to M."""
    assert counts.numel() == w1.shape[0] == w3.shape[0] == w2.shape[0], "one count per expert"
    assert counts.device == x_sorted.device, "counts must be on the rows' device (no host sync)"
    if x_sorted.shape[0] == 0:
        return x_sorted.new_zeros(x_sorted.shape)
    if x_sorted.is_cuda and torch.is_autocast_enabled("cuda"):
        # autocast does not reach custom kernels: cast as it would for a matmul, so that the grouped
        # GEMMs run on bf16 tensor cores like the reference does under autocast
        dtype = torch.get_autocast_dtype("cuda")
        x_sorted, w1, w3, w2 = (t.to(dtype) for t in (x_sorted, w1, w3, w2))
    x_sorted, w1, w3, w2 = (t.contiguous() for t in (x_sorted, w1, w3, w2))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x_sorted, w1, w3, w2)):
        return _GroupedSwiGLU.apply(x_sorted, counts, w1, w3, w2)
    schedule = grouped_tile_schedule(counts, x_sorted.shape[0])[:3]
    return _grouped_swiglu_forward(x_sorted, schedule, w1, w3, w2, save_preact=False)[0]  # inference


def moe_grouped_swiglu_flops(n_rows: int, dim: int, inter_dim: int, backward: bool = False) -> int:
    """Matmul FLOPs of the routed experts on n_rows = tokens * top-k rows (3 GEMMs forward, 6 backward)."""
    return (12 if backward else 6) * n_rows * dim * inter_dim


# -----------------------------------------------------------------------------
# 3. MLA absorbed decode attention (DeepSeek-V2 §2.1.2; the FlashMLA idea, split-KV)
#
#   for each (block of BLOCK_H heads, split i of the cache, batch b):    one program
#       online softmax over s in split i of score_s = (q.c_s + q_rope.k_rope_s) * scale, in float32
#       part_out[i] = sum_s p_s c_s / sum_s p_s,   part_lse[i] = log2 sum_s 2^score_s
#   out = sum_i 2^part_lse[i] part_out[i] / sum_i 2^part_lse[i]           a second, small kernel
#
# The latent c_s is key and value at once. Split-KV (flash-decoding): cutting the cache along S makes
# enough programs to fill every SM even for a long cache at small batch, and each streams its chunk of
# the latent once for BLOCK_H heads (all heads share the latent: that is MLA's point).
# Memory traffic: the cache once, B * S * (kv_lora_rank + rope_dim) * elem (re-read from L2 by the other
# head blocks when H > BLOCK_H), the queries, and B * H * n_splits * (kv_lora_rank + 1) * 4 bytes of
# partials written and read once. The reference (mla.latent_attention) materialises the (B, H, S) scores three times over
# (q.c, q.k^R, their sum), then the float32 probabilities and their cast. Decode only: no backward.

if INTERPRET:
    MLA_DECODE_CONFIGS = [triton.Config({"BLOCK_H": 16, "BLOCK_S": 16}, num_warps=1)]
    DECODE_MIN_SPLIT_LEN, DECODE_SPLIT_GRANULE = 16, 16
else:
    MLA_DECODE_CONFIGS = [
        triton.Config({"BLOCK_H": 16, "BLOCK_S": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_H": 16, "BLOCK_S": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_H": 32, "BLOCK_S": 32}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_H": 64, "BLOCK_S": 32}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_H": 16, "BLOCK_S": 16}, num_warps=4, num_stages=1),  # fits any GPU's shared memory
    ]
    DECODE_MIN_SPLIT_LEN, DECODE_SPLIT_GRANULE = 256, 64


# key leaves out S on purpose: the cache grows by one token per step, which must not re-tune
@triton.autotune(configs=MLA_DECODE_CONFIGS, key=["H", "C", "R"])
@triton.jit
def _mla_decode_split_kernel(q_ptr, q_rope_ptr, kv_ptr, k_rope_ptr, part_out_ptr, part_lse_ptr,
                             H, S, C, R, split_len, n_splits, scale_log2e, PRECISION: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
                             BLOCK_S: tl.constexpr):
    """Program (head block, split, batch): online softmax over cache tokens
    [split * split_len, (split + 1) * split_len), all BLOCK_H heads sharing each loaded latent tile.
    Writes the split's normalised output and its log2-sum-exp for the combine."""
    head_block, split, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    c, r = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_R)
    h_mask, c_mask, r_mask = heads < H, c < C, r < R
    q = tl.load(q_ptr + (b * H + heads[:, None]) * C + c[None, :], mask=h_mask[:, None] & c_mask[None, :],
                other=0.0)  # (BLOCK_H, BLOCK_C)
    q_rope = tl.load(q_rope_ptr + (b * H + heads[:, None]) * R + r[None, :],
                     mask=h_mask[:, None] & r_mask[None, :], other=0.0)  # (BLOCK_H, BLOCK_R)
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    s_begin = split * split_len
    s_end = tl.minimum(s_begin + split_len, S)
    for s0 in range(s_begin, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_mask = s < s_end
        kv = tl.load(kv_ptr + (b * S + s[:, None]) * C + c[None, :], mask=s_mask[:, None] & c_mask[None, :],
                     other=0.0)  # (BLOCK_S, BLOCK_C): the latent is both key and value
        k_rope = tl.load(k_rope_ptr + (b * S + s[:, None]) * R + r[None, :],
                         mask=s_mask[:, None] & r_mask[None, :], other=0.0)  # (BLOCK_S, BLOCK_R)
        scores = tl.dot(q, tl.trans(kv), input_precision=PRECISION)
        scores = tl.dot(q_rope, tl.trans(k_rope), scores, input_precision=PRECISION)  # (BLOCK_H, BLOCK_S)
        scores = tl.where(s_mask[None, :], scores * scale_log2e, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(kv.dtype), kv, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    out_offs = ((b * H + heads[:, None]) * n_splits + split) * C + c[None, :]
    tl.store(part_out_ptr + out_offs, acc / l_i[:, None], mask=h_mask[:, None] & c_mask[None, :])
    tl.store(part_lse_ptr + (b * H + heads) * n_splits + split, m_i + tl.log2(l_i), mask=h_mask)


@triton.jit
def _mla_decode_combine_kernel(part_out_ptr, part_lse_ptr, out_ptr, C, n_splits,
                               BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (batch * head, column block): out = sum_i w_i out_i with w_i = 2^(lse_i) / sum_j 2^(lse_j)."""
    row, c = tl.program_id(0).to(tl.int64), tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    splits = tl.arange(0, BLOCK_SPLITS)
    lse = tl.load(part_lse_ptr + row * n_splits + splits, mask=splits < n_splits, other=float("-inf"))
    weights = tl.exp2(lse - tl.max(lse, axis=0))
    weights = weights / tl.sum(weights, axis=0)  # (BLOCK_SPLITS,)
    parts = tl.load(part_out_ptr + (row * n_splits + splits[:, None]) * C + c[None, :],
                    mask=(splits < n_splits)[:, None] & (c < C)[None, :], other=0.0)  # (BLOCK_SPLITS, BLOCK_C)
    out = tl.sum(weights[:, None] * parts, axis=0)
    tl.store(out_ptr + row * C + c, out.to(out_ptr.dtype.element_ty), mask=c < C)


MAX_DECODE_SPLITS = 64  # keeps the combine kernel's (splits x BLOCK_C) tile in registers


@functools.lru_cache(maxsize=None)
def _n_sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _decode_split_len(batch: int, n_heads: int, cache_len: int, device) -> int:
    """Cache tokens per split: enough (batch, head block, split) programs to fill every SM about
    twice (flash-decoding), but splits long enough to pay for their query load and the combine."""
    programs = batch * triton.cdiv(n_heads, 16)
    splits = min(MAX_DECODE_SPLITS, max(1, triton.cdiv(2 * _n_sms(device), programs)))
    split_len = max(triton.cdiv(cache_len, splits), DECODE_MIN_SPLIT_LEN, triton.cdiv(cache_len, MAX_DECODE_SPLITS))
    return triton.cdiv(split_len, DECODE_SPLIT_GRANULE) * DECODE_SPLIT_GRANULE


def mla_decode_attention(q_latent, q_rope, kv_latent, k_rope, softmax_scale, num_splits=None):
    """Absorbed MLA decode for one new token per sequence: (B, H, kv_lora_rank), as mla.latent_attention with
    T = 1 (q_latent (B, H, kv_lora_rank), q_rope (B, H, rope_dim)). num_splits overrides the split-KV heuristic
    (for tests)."""
    B, H, C = q_latent.shape
    S, R = kv_latent.shape[1], q_rope.shape[-1]
    assert S >= 1 and kv_latent.shape == (B, S, C) and k_rope.shape == (B, S, R) and q_rope.shape == (B, H, R)
    assert q_latent.dtype == q_rope.dtype == kv_latent.dtype == k_rope.dtype, "one dtype for queries and cache"
    q_latent, q_rope, kv_latent, k_rope = (t.contiguous() for t in (q_latent, q_rope, kv_latent, k_rope))
    split_len = _decode_split_len(B, H, S, q_latent.device) if num_splits is None else triton.cdiv(S, num_splits)
    n_splits = triton.cdiv(S, split_len)  # every split holds >= 1 token, so every log-sum-exp is finite
    part_out = torch.empty(B, H, n_splits, C, dtype=torch.float32, device=q_latent.device)
    part_lse = torch.empty(B, H, n_splits, dtype=torch.float32, device=q_latent.device)
    grid = lambda meta: (triton.cdiv(H, meta["BLOCK_H"]), n_splits, B)  # noqa: E731  head blocks adjacent: L2 reuse
    _mla_decode_split_kernel[grid](q_latent, q_rope, kv_latent, k_rope, part_out, part_lse, H, S, C, R,
                                   split_len, n_splits, softmax_scale * math.log2(math.e),
                                   PRECISION=_dot_precision(kv_latent.dtype), BLOCK_C=_pow2_at_least_16(C),
                                   BLOCK_R=_pow2_at_least_16(R))
    out = torch.empty(B, H, C, dtype=kv_latent.dtype, device=q_latent.device)
    block_c = min(64, _pow2_at_least_16(C))
    _mla_decode_combine_kernel[(B * H, triton.cdiv(C, block_c))](
        part_out, part_lse, out, C, n_splits, BLOCK_SPLITS=_pow2_at_least_16(n_splits), BLOCK_C=block_c)
    return out


def mla_decode_bytes(batch: int, n_heads: int, cache_len: int, kv_lora_rank: int, rope_dim: int,
                     elem_bytes: int = 2) -> int:
    """Bytes a decode step must move: the latent cache once, the queries, the output."""
    cache = batch * cache_len * (kv_lora_rank + rope_dim)
    queries = batch * n_heads * (kv_lora_rank + rope_dim)
    return (cache + queries + batch * n_heads * kv_lora_rank) * elem_bytes


# -----------------------------------------------------------------------------
# 4. The switch: which op runs its kernel, and the helpers the launches share
#
# One switch, like DeepSeek-V3's gemm_impl: the scripts call set_mode(--kernels, device, dtype) once, and
# the model files ask use_triton(device, op, dtype) before each op. "torch" runs the references, "triton"
# the kernels, "auto" a kernel on CUDA tensors when triton is installed and the GPU and dtype suit it
# (unsupported: sm80+); "auto" never picks the interpreter (far too slow for a default), --kernels=triton does.

MODES = ("auto", "triton", "torch")
OPS = ("engram_lookup", "moe_grouped_swiglu", "mla_decode_attention")
mode = "auto"  # set once by the scripts from --kernels (set_mode); read by use_triton

# Which GPUs a kernel is known to suit. Triton's supported NVIDIA GPUs are compute capability 8.0+ (Ampere,
# Ada, Hopper): since Triton 3.3 a tl.dot below sm80 compiles to plain FMA loops, without tensor cores
# (triton-lang/triton PR 5066), far slower than the cuBLAS matmuls the references call. Every kernel here
# compiles ahead of time for sm75 as well as sm90 (tests/test_kernels.py), but compiling is not running well,
# so "auto" keeps V100s (7.0) and T4s (7.5) on the references. The tensor-core kernels (MoE, MLA decode)
# take bf16, fp16 and fp32 (TF32 where torch's own matmuls use it) operands on sm80+.
MIN_CAPABILITY = (8, 0)
DOT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def unsupported(op: str, capability, dtype) -> str:
    """Why op's Triton kernel should not run on a CUDA GPU of this (major, minor) capability with operands
    of this dtype; "" where it is known to compile and run."""
    if tuple(capability) < MIN_CAPABILITY:
        return (f"compute capability {capability[0]}.{capability[1]} is below {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}, "
                "the oldest Triton supports (its tl.dot has no tensor cores there)")
    if op != "engram_lookup" and dtype not in DOT_DTYPES:  # the lookup only gathers rows: any dtype
        return f"{str(dtype).replace('torch.', '')} operands have no tensor-core tl.dot here"
    return ""


@functools.lru_cache(maxsize=None)
def _capability(device) -> tuple:
    return torch.cuda.get_device_capability(device)


def compute_dtype(x):
    """The dtype a kernel's tl.dot sees for x: autocast's on a GPU under autocast (the MoE op casts to it)."""
    return torch.get_autocast_dtype("cuda") if x.is_cuda and torch.is_autocast_enabled("cuda") else x.dtype


def set_mode(new_mode: str, device="cpu", dtype=torch.float32) -> None:
    """Validate --kernels for the device the model runs on and its compute dtype (autocast's, or the
    weights'), then set the module-level mode. --kernels=triton where a kernel cannot run is an error."""
    global mode
    if new_mode not in MODES:
        raise ValueError(f"--kernels={new_mode!r}: expected one of {', '.join(MODES)}")
    if new_mode == "triton" and not HAVE_TRITON:
        raise ValueError("--kernels=triton: triton is not installed; use --kernels=torch (or auto)")
    device = torch.device(device)
    if new_mode == "triton" and device.type != "cuda" and not INTERPRET:
        raise ValueError(f"--kernels=triton: the tensors are on {device}, and the Triton kernels "
                         "need a CUDA GPU (or TRITON_INTERPRET=1 set before kernels.py is imported, to "
                         "run them slowly on the CPU); use --kernels=torch or auto")
    if new_mode == "triton" and device.type == "cuda":
        reasons = {unsupported(op, _capability(device), dtype) for op in OPS} - {""}
        if reasons:
            raise ValueError(f"--kernels=triton: {torch.cuda.get_device_name(device)} "
                             f"{'; '.join(sorted(reasons))}; use --kernels=auto (the kernels that can run) or torch")
    mode = new_mode


def use_triton(device, op=None, dtype=torch.float32) -> bool:
    """True when op (one of OPS; None: any kernel) should run its Triton kernel for tensors on device whose
    tl.dot operands have dtype: "auto" picks it on a CUDA GPU where it is known to run (unsupported)."""
    device = torch.device(device)
    if mode == "auto":
        return HAVE_TRITON and device.type == "cuda" and not INTERPRET and \
            not unsupported(op or "engram_lookup", _capability(device), dtype)
    return mode == "triton"


def plan(device, dtype=torch.float32) -> dict:
    """{op: 'triton' or 'torch (why)'} under the current mode, for announcing what a run will use."""
    device, out = torch.device(device), {}
    for op in OPS:
        if use_triton(device, op, dtype):
            out[op] = "triton"
        elif mode == "torch":
            out[op] = "torch (--kernels=torch)"
        elif device.type != "cuda":
            out[op] = f"torch (no CUDA GPU: {device.type})"
        elif not HAVE_TRITON or INTERPRET:
            out[op] = "torch (triton is not installed)" if not HAVE_TRITON else "torch (auto skips the interpreter)"
        else:
            out[op] = f"torch ({unsupported(op, _capability(device), dtype)})"
    return out


def _pow2_at_least_16(n: int) -> int:
    # tl.arange needs a power of two, tl.dot operands at least 16 along each dimension
    return max(16, 1 << max(0, n - 1).bit_length())


def _dot_precision(dtype) -> str:
    """tl.dot precision for float32 operands: TF32 only where torch's own matmuls use it too,
    so that --kernels=triton and --kernels=torch agree to float tolerance."""
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return "tf32" if dtype == torch.float32 and tf32 else "ieee"
