"""Engram: conditional memory via scalable lookup (DeepSeek, arXiv 2601.07372, §2).

A transformer spends early layers rebuilding static local patterns ("New York",
"once upon a"). Engram hands that job to a lookup: the last few tokens (an N-gram)
are hashed into big embedding tables, and the retrieved vector is mixed into the
residual stream of a few chosen blocks. The file follows the paper's Section 2:

  1. tokenizer compression   token id -> canonical id (case/accent/space folded)
  2. multi-head hashing      suffix N-grams of canonical ids -> one row per head
  3. multi-head embedding    gather the rows, concatenate -> memory vector e_t
  4. context-aware gating    alpha_t from <RMSNorm(W_K e_t), RMSNorm(h_t)>
  5. short convolution       causal depthwise conv over the gated values

The hashes depend only on token ids (computable ahead of time: the paper's systems argument): the
canonical ids are made once per forward (TokenizerCompression), then each layer looks up and mixes.
"""
import math
import re
import unicodedata
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import cli  # check_numbers: the checks every config's numbers get
import kernels  # on a GPU, §2.2's hash and §3's gather fused in one Triton kernel (use_triton decides)


@dataclass
class EngramConfig:  # names carry 'engram' or 'ngram' so that flat CLI flags are unique across configs
    engram_layers: tuple[int, ...] = (1,)       # blocks that hold an Engram module
    ngram_orders: tuple[int, ...] = (2, 3)      # N of the suffix N-grams that are hashed
    engram_heads_per_order: int = 4             # K hash heads per order
    engram_dim_per_order: int = 64              # split across that order's heads
    engram_rows_per_head: int = 4099            # approximate; each head gets a distinct prime >= this
    engram_kernel_size: int = 4                 # short conv kernel w
    engram_short_conv: bool = True              # short conv branch (§2.3); false = DeepSeek-V4.1 (no ShortConv)
    engram_compress: bool = True                # tokenizer compression (§2.2)
    engram_gate: bool = True                    # context-aware gate (§2.3); off = plain additive memory
    engram_seed: int = 0                        # seeds the hash multipliers ('demo' hash only)
    engram_hash: str = "demo"                   # hash multipliers: 'demo' (DeepSeek's demo: one torch draw seeded by
                                                # engram_seed) | 'v41' (DeepSeek-V4.1: numpy default_rng(10007 x
                                                # block index) per layer, up to int64 max / V'; same hash formula)
    engram_lr_mult: float = 5.0                 # tables: Adam lr x 5 (paper's setting)
    engram_weight_decay: float = 0.0            # tables: no weight decay (paper's setting)
    engram_sparse: bool = True                  # train the tables sparsely: only the rows a batch looked up (§3)

    def __post_init__(self):
        cli.check_numbers(self, at_least_1=("engram_heads_per_order", "engram_kernel_size"),
                          nonneg=("engram_lr_mult", "engram_weight_decay"), seeds=("engram_seed",),
                          one_of={"engram_hash": ("demo", "v41")})
        orders = self.ngram_orders
        if not orders or min(orders) < 1 or len(set(orders)) != len(orders):
            raise ValueError(f"ngram_orders={','.join(map(str, orders))} must be distinct orders >= 1, e.g. 2,3")
        if self.engram_dim_per_order < 1 or self.engram_dim_per_order % self.engram_heads_per_order:
            raise ValueError(f"engram_dim_per_order={self.engram_dim_per_order} must split evenly into "
                             f"engram_heads_per_order={self.engram_heads_per_order} heads")
        if self.engram_rows_per_head < 2:
            raise ValueError(f"--engram_rows_per_head={self.engram_rows_per_head}: must be at least 2")
        if self.engram_hash == "v41" and self.engram_seed:
            raise ValueError(f"--engram_seed={self.engram_seed}: unused by --engram_hash=v41 (it seeds each layer "
                             "with 10007 x its block index); leave it at 0")
        if self.engram_sparse and self.engram_weight_decay:
            raise ValueError(f"--engram_weight_decay={self.engram_weight_decay} needs --engram_sparse=false: "
                             "the sparse (lazy Adam) table update has no weight decay")


# -----------------------------------------------------------------------------
# 1. Tokenizer compression (§2.2)
# A BPE vocabulary spends many ids on surface variants of one word (" Hello", "Hello",
# "HELLO"). Folding them onto one canonical id before hashing means they share memory
# rows, so the tables hold more distinct N-grams per row.

def normalize_token(token: bytes) -> str | bytes:
    """The canonical key of one token's raw bytes (equal keys share a canonical id)."""
    try:
        text = token.decode("utf-8")
    except UnicodeDecodeError:
        return token  # a partial UTF-8 sequence has no text: its own bytes are its key
    key = unicodedata.normalize("NFKC", text)  # compatibility forms: "ﬁ" -> "fi", full-width -> ASCII
    key = unicodedata.normalize("NFD", key)  # split accents off their letters ...
    key = "".join(c for c in key if not unicodedata.combining(c))  # ... and drop them: "café" -> "cafe"
    key = re.sub(r"\s+", " ", key.lower())  # case folded, any whitespace run -> one space
    if key != " ":  # a whitespace-only token keeps its single space
        key = key.strip()  # " hello" -> "hello"
    return key if key else text  # a token of only combining marks keeps its own text


def build_canonical_ids(token_bytes: list[bytes]) -> torch.Tensor:
    """(V,) int64 map from token id to a dense canonical id in 0..V'-1."""
    key_to_id = {}
    canonical = [key_to_id.setdefault(normalize_token(b), len(key_to_id)) for b in token_bytes]
    return torch.tensor(canonical, dtype=torch.long)


def compression_reduction(canonical_ids: torch.Tensor) -> float:
    """1 - V'/V: the fraction of the vocabulary that compression folds away."""
    n_canonical = len(set(canonical_ids.tolist()))
    return 1.0 - n_canonical / len(canonical_ids)


class TokenizerCompression(nn.Module):
    """Token ids -> canonical ids with max_order-1 columns of left context: what every Engram
    layer hashes, computed once per forward for all of them (no parameters).

    Buffers (they follow .to(device) and are saved in checkpoints): canonical_ids (V,) and
    pad_id, a 0-dim tensor one past the last canonical id, so it is no real token.
    """

    def __init__(self, cfg: EngramConfig, vocab_size: int, token_bytes: list[bytes] | None = None):
        super().__init__()
        self.max_order = max(cfg.ngram_orders)
        if cfg.engram_compress and token_bytes is not None:
            if len(token_bytes) != vocab_size:
                raise ValueError(f"need one byte string per token id: {len(token_bytes)} for {vocab_size} ids")
            canonical_ids = build_canonical_ids(token_bytes)
        else:
            canonical_ids = torch.arange(vocab_size)  # compression off: identity
        self.n_canonical = int(canonical_ids.max()) + 1  # V'
        self.reduction = compression_reduction(canonical_ids)
        self.register_buffer("canonical_ids", canonical_ids)
        self.register_buffer("pad_id", torch.tensor(self.n_canonical))

    def forward(self, ids, prefix=None):
        """(B, T) ids [+ (B, P) previous ids] -> (B, P+T) canonical ids, P = max_order-1.
        Without prefix the left context is pads; inside prefix, an id < 0 also means
        "before the start of the sequence" (pad), for a decode that has seen < P tokens."""
        B, P = ids.shape[0], self.max_order - 1
        canon = self.canonical_ids[ids]  # (B, T)
        if prefix is None:
            left = self.pad_id.expand(B, P)
        else:
            left = torch.where(prefix >= 0, self.canonical_ids[prefix.clamp_min(0)], self.pad_id)  # (B, P)
        return torch.cat([left, canon], dim=1)  # (B, P+T)


# -----------------------------------------------------------------------------
# 2. Multi-head hashing (§2.2)
# Each of K heads hashes the N-gram into its own table. The table sizes are distinct
# primes, so two N-grams that collide in one head almost never collide in the others,
# and the model can tell them apart from the concatenation of all heads:
#     hash(n, head)_t = (XOR_{j<n} c_{t-j} * m_j) mod p_head     c: canonical ids, m: odd multipliers
# hash_ngrams below is that line for every head at once; the primes, the multipliers and
# the left context it reads follow it.

def hash_ngrams(context, multipliers, head_primes, head_offsets, ngram_orders, heads_per_order):
    """Multi-head N-gram hash of one Engram layer: rows (B, T, H) int64 into its table.

    context (B, P+T) canonical ids, the first P = max_order-1 the left context (earlier ids or the pad
    id) that completes the first N-grams; multipliers (max_order,) odd; head_primes, head_offsets (H,)
    each head's table size and first row, heads order-major (all of ngram_orders[0] first).
    row(n, head)_t = (XOR_{j<n} c_{t-j} * m_j) mod p_head + offset_head
    Every c < pad+1 and every m < 2**62 // (pad+1), so no product overflows int64 and the
    XOR stays non-negative: the modulo is a plain non-negative remainder.
    """
    max_order = multipliers.shape[0]
    T = context.shape[1] - (max_order - 1)
    mixes, mix = {}, None
    for j in range(max_order):  # j = 0 is the current token, j = 1 the one before, ...
        start = max_order - 1 - j
        term = context[:, start:start + T] * multipliers[j]  # (B, T): c_{t-j} * m_j
        mix = term if mix is None else torch.bitwise_xor(mix, term)
        mixes[j + 1] = mix  # (B, T): hash of the suffix (j+1)-gram, before the modulo
    rows = [mixes[n][..., None] % head_primes[i * heads_per_order:(i + 1) * heads_per_order]  # (B, T, K)
            for i, n in enumerate(ngram_orders)]
    return torch.cat(rows, dim=-1) + head_offsets  # (B, T, H)


def is_prime(n: int) -> bool:
    """Trial division by 2, 3 and numbers 6k +- 1 up to sqrt(n); fast enough for tables of 1e9 rows."""
    if n < 4:
        return n >= 2
    if n % 2 == 0 or n % 3 == 0:
        return False
    d = 5
    while d * d <= n:
        if n % d == 0 or n % (d + 2) == 0:
            return False
        d += 6
    return True


def head_table_sizes(cfg: EngramConfig) -> list[list[int]]:
    """Table size of every head: [layer slot][head], heads ordered order-major (all
    heads of ngram_orders[0], then of ngram_orders[1], ...). Walking upward from
    engram_rows_per_head and taking each next prime keeps every size distinct across
    all heads of all orders of all layers, and makes the sizes a pure function of cfg."""
    sizes, candidate = [], cfg.engram_rows_per_head
    for _ in cfg.engram_layers:
        layer_sizes = []
        for _ in range(len(cfg.ngram_orders) * cfg.engram_heads_per_order):
            while not is_prime(candidate):
                candidate += 1
            layer_sizes.append(candidate)
            candidate += 1
        sizes.append(layer_sizes)
    return sizes


def hash_multipliers(cfg: EngramConfig, n_canonical: int) -> torch.Tensor:
    """(L, max_order) odd int64 multipliers, a fresh draw per layer so that each layer's hash is
    independent. Bounded so that c * m < 2**62 for every id c <= pad id (= n_canonical): the
    products cannot overflow int64 and the XOR of them stays non-negative.

    engram_hash='v41' is DeepSeek-V4.1's rule instead (transformers' deepseek_v41 compute_hash_multipliers): for
    the layer in block L, numpy's default_rng(10007 * L) draws max_order integers in [0, (2**63 - 1) // V' // 2),
    each then 2x + 1. Then c * m <= V' * ((2**63 - 1) // V' - 1) < 2**63 - V' for every id c <= pad id (= V'):
    still no overflow, and still a non-negative XOR. The hash formula is the same, only these constants differ."""
    if cfg.engram_hash == "v41":
        bound = max(1, (2**63 - 1) // n_canonical // 2)
        rows = [np.random.default_rng(10007 * layer).integers(0, bound, size=max(cfg.ngram_orders), dtype=np.int64)
                for layer in cfg.engram_layers]
        return 2 * torch.tensor(np.array(rows, dtype=np.int64).reshape(len(rows), -1)) + 1
    bound = 2**62 // (n_canonical + 1)
    gen = torch.Generator().manual_seed(cfg.engram_seed)
    half = torch.randint(0, bound // 2, (len(cfg.engram_layers), max(cfg.ngram_orders)), generator=gen)
    return 2 * half + 1


def table_params(cfg: EngramConfig) -> int:
    """Parameters in all Engram tables of a model with this config (their rows times head_dim)."""
    return cfg.engram_dim_per_order // cfg.engram_heads_per_order * sum(map(sum, head_table_sizes(cfg)))


# -----------------------------------------------------------------------------
# 3. Multi-head embedding (§2.2): one table for all heads of a layer; a head's rows
# start at its offset (the sum of the sizes before it), so one gather fetches every
# head, and e_t is the heads' rows side by side, order-major.
#
# Sparse training (engram_sparse): a step looks up 16 x 128 tokens x 8 heads = 16K rows however
# large the table, so the gradient is those rows and their values (a sparse COO tensor), and
# GPT.configure_optimizers updates only them, with lazy Adam (torch.optim.SparseAdam): the table
# can grow at a flat step cost (the paper's systems claim). Unlike dense Adam, lazy Adam leaves a
# row the batch missed as it was, not moved on stale momentum (RESULTS.md, "Scalable memory").

def lookup(context, multipliers, head_primes, head_offsets, ngram_orders, heads_per_order, table, sparse=False):
    """e_t of one layer straight from canonical ids: hash_ngrams, then one gather for every head from the
    layer's table (sum of primes, head_dim) -> (B, T, H * head_dim), heads side by side, order-major.
    sparse=True gives the table a sparse COO gradient holding only the looked-up rows."""
    if kernels.use_triton(table.device, "engram_lookup", table.dtype):  # the hash and the gather in one kernel
        return kernels.engram_lookup(context, multipliers, head_primes, head_offsets, ngram_orders, heads_per_order,
                                     table, sparse)
    rows = hash_ngrams(context, multipliers, head_primes, head_offsets, ngram_orders, heads_per_order)  # (B, T, H)
    return (sparse_embedding(rows, table) if sparse else F.embedding(rows, table)).flatten(-2)


@torch.compiler.disable
def sparse_embedding(rows, table):
    """F.embedding with a sparse gradient, kept out of torch.compile's graphs: Inductor's post-grad passes
    cannot hold a sparse tensor ("Cannot access storage of SparseTensorImpl"), so under --compile this
    lookup and its backward run eagerly, between the compiled parts."""
    return F.embedding(rows, table, sparse=True)


class Table(nn.Embedding):
    """One layer's rows of every head, resident on the model's device: weight (sum of primes, head_dim).
    Rows that live elsewhere (on other ranks, in host memory, in a file) are memory.py's tables, which
    answer the same lookup."""

    def lookup(self, context, layer):  # (B, P+T) canonical ids -> (B, T, H * head_dim)
        return lookup(context, layer.multipliers, layer.head_primes, layer.head_offsets, layer.cfg.ngram_orders,
                      layer.cfg.engram_heads_per_order, self.weight, self.sparse)


# -----------------------------------------------------------------------------
# 4. Context-aware gating (§2.3)
# The lookup is context-free: a hash collision or an N-gram that means something else
# here would inject noise. The hidden state h_t, which has seen the whole context,
# acts as the query; the gate closes where the memory disagrees with it.

def signed_sqrt(x, eps=1e-6):
    """sign(x) * sqrt(|x|): keeps the sign, tames the magnitude so the sigmoid does not
    saturate. |x| is clamped at eps so the gradient stays finite at 0."""
    return x.sign() * x.abs().clamp_min(eps).sqrt()


def context_gate(normed_key, normed_hidden):
    """alpha_t = sigmoid(signed_sqrt(<k_t, h_t> / sqrt(d))): (..., d) x2 -> (...) in (0, 1)."""
    score = (normed_key * normed_hidden).sum(dim=-1) / math.sqrt(normed_key.shape[-1])
    return torch.sigmoid(signed_sqrt(score))


class StreamRMSNorm(nn.Module):
    """RMSNorm of each of n residual streams (mhc.py) over its own dim, each with its own gain:
    (..., n, dim) -> (..., n, dim). With one stream it is nn.RMSNorm(dim), to the last bit: the norm
    reads the stream tensor itself (no slicing view in between), and its gain keeps that one's shape."""

    def __init__(self, n_streams: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_streams * dim))  # (n*dim,): stream m's gain is row m

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],)) * self.weight.view(x.shape[-2], -1)


# -----------------------------------------------------------------------------
# 5. Short convolution (§2.3)
# A causal depthwise conv over time widens each position's view of the gated memory.
# Dilation = the largest N-gram order, so its taps land on neighbouring N-grams.
# Zero-initialised, the branch starts at exactly 0: Engram begins as plain gated memory.
# On n residual streams (mhc.py) each stream has its own RMSNorm, and the conv is depthwise
# over all n * dim channels, as in DeepSeek's demo (hc_mult = 4).

class ShortConv(nn.Module):
    def __init__(self, dim, kernel_size, dilation, n_streams=1):
        super().__init__()
        self.context = (kernel_size - 1) * dilation  # how many past steps one output sees
        self.norm = StreamRMSNorm(n_streams, dim)
        channels = n_streams * dim
        self.conv = nn.Conv1d(channels, channels, kernel_size, dilation=dilation, groups=channels, bias=False)

    def forward(self, x, cache=None):  # (B, T, n, dim) -> (B, T, n, dim)
        B, T, n, C = x.shape
        x = self.norm(x).flatten(2)  # (B, T, n*dim): the streams side by side, one conv channel each
        if cache is not None and "engram_conv" in cache:
            past = cache["engram_conv"]  # (B, context, n*dim): normed inputs of earlier steps
        else:
            past = x.new_zeros(B, self.context, n * C)  # causal zero padding before the sequence
        x = torch.cat([past, x], dim=1)  # (B, context + T, n*dim)
        if cache is not None:
            cache["engram_conv"] = x[:, x.shape[1] - self.context:].detach()
        y = self.conv(x.transpose(1, 2)).transpose(1, 2)  # (B, T, n*dim), no padding needed
        return F.silu(y).view(B, T, n, C)


# -----------------------------------------------------------------------------
# The Engram layer: Y = V~ + SiLU(Conv(RMSNorm(V~))), with V~ = alpha * W_V e. The model
# adds Y to the residual stream before attention: h = h + engram(h, context).
# On n residual streams (mhc.py), as in DeepSeek's demo: the table, the lookup and W_V are
# shared; stream m has its own W_K^(m) and RMSNorms, so its own gate alpha_t^(m) (its hidden
# state is the query), and Y^(m) = alpha^(m) W_V e (+ conv) goes to stream m. n = 1 is §2.

class Engram(nn.Module):
    def __init__(self, dim: int, cfg: EngramConfig, layer_slot: int, n_canonical: int, n_streams: int = 1,
                 table_device=None):
        # layer_slot indexes cfg.engram_layers: it picks this layer's table sizes and hash
        # multipliers; n_canonical (TokenizerCompression.n_canonical) bounds the multipliers;
        # table_device='meta' makes the table a shape without memory (its rows will come from a file)
        super().__init__()
        head_dim = cfg.engram_dim_per_order // cfg.engram_heads_per_order
        d_mem = len(cfg.ngram_orders) * cfg.engram_dim_per_order  # size of e_t
        self.cfg, self.use_gate, self.n_streams = cfg, cfg.engram_gate, n_streams
        primes = torch.tensor(head_table_sizes(cfg)[layer_slot])  # (H,) one table size per head
        self.register_buffer("multipliers", hash_multipliers(cfg, n_canonical)[layer_slot])  # (max_order,)
        self.register_buffer("head_primes", primes)
        self.register_buffer("head_offsets", primes.cumsum(0) - primes)  # (H,) each head's first row
        self.n_rows, self.head_dim = int(primes.sum()), head_dim
        self.table = Table(self.n_rows, head_dim, sparse=cfg.engram_sparse, device=table_device)  # every head's rows
        self.value_proj = nn.Linear(d_mem, dim, bias=False)  # W_V
        if self.use_gate:
            self.key_proj = nn.Linear(d_mem, n_streams * dim, bias=False)  # every stream's W_K, side by side
            self.key_norm = StreamRMSNorm(n_streams, dim)
            self.hidden_norm = StreamRMSNorm(n_streams, dim)
        self.short_conv = ShortConv(dim, cfg.engram_kernel_size, max(cfg.ngram_orders), n_streams) \
            if cfg.engram_short_conv else None  # DeepSeek-V4.1 has none: Y = V~
        self.last_gate = None  # (B, T, n) gates of the last forward, detached (for sample.py --show_gates)
        self.knockout = False  # True: the block skips this layer's output (analyze.py's knockout, paper §6.3)
        self.reset_parameters()

    def reset_parameters(self):
        """Call after any generic init of the model: it must not undo these two.
        The table is a bank of extra (N-gram) token embeddings, so it is drawn like the
        token embedding, normal(0, 0.02): the gate's RMSNorm makes alpha independent of
        this scale, and a small scale keeps the value branch a small perturbation of the
        residual stream at init. The conv is zero so the conv branch starts at exactly 0."""
        nn.init.normal_(self.table.weight, mean=0.0, std=0.02)
        if self.short_conv is not None:
            nn.init.zeros_(self.short_conv.conv.weight)

    def forward(self, h, context, cache: dict | None = None):
        # h (B, T, n, dim) hidden states of the n streams, context (B, P+T) canonical ids
        # (TokenizerCompression) -> (B, T, n, dim)
        e = self.table.lookup(context, self)  # (B, T, d_mem)  e_t: every head's row, side by side (§2.2-3)
        value = self.value_proj(e)[:, :, None]  # (B, T, 1, dim)  v_t = W_V e_t, one for every stream
        if self.use_gate:
            keys = self.key_proj(e).unflatten(-1, (self.n_streams, -1))  # (B, T, n, dim)  k_t^(m) = W_K^(m) e_t
            gate = context_gate(self.key_norm(keys), self.hidden_norm(h))  # (B, T, n)  alpha_t^(m)
            self.last_gate = gate.detach()
            value = gate[..., None] * value  # (B, T, n, dim)  v~_t^(m) = alpha_t^(m) v_t
        else:
            value = value.expand(-1, -1, self.n_streams, -1)  # (B, T, n, dim)  the same memory for each stream
        if self.short_conv is None:  # --engram_short_conv=false (DeepSeek-V4.1): the gated memory alone
            return value
        return value + self.short_conv(value, cache)  # (B, T, n, dim)

    def rows(self, context):
        """(B, P+T) canonical ids -> (B, T, H) this layer's table rows (§2.2's hash), on context's device:
        what a table that lives elsewhere is asked for (memory.py)."""
        on = context.device
        return hash_ngrams(context, self.multipliers.to(on), self.head_primes.to(on), self.head_offsets.to(on),
                           self.cfg.ngram_orders, self.cfg.engram_heads_per_order)

    def custom_param_groups(self) -> list[dict]:
        # the tables get their own optimiser group: Adam lr x 5, no weight decay (paper);
        # 'sparse' sends it to lazy Adam (GPT.configure_optimizers). A table in a file has no parameter.
        weight = getattr(self.table, "weight", None)
        return [] if weight is None else [{"params": [weight], "lr_mult": self.cfg.engram_lr_mult,
                                           "weight_decay": self.cfg.engram_weight_decay, "sparse": self.table.sparse}]

    def n_table_params(self) -> int:
        # looked up, not multiplied: not "active" compute parameters; counted whole wherever the rows live
        return self.n_rows * self.head_dim
