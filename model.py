"""The GPT that ties nano-engram together.

A decoder-only transformer in the nanoGPT mould (pre-norm blocks, tied token
embedding and output head), in which three parts are chosen by config:

    attention  'mha' : multi-head attention with RoPE          (this file)
               'mla' : Multi-head Latent Attention             (mla.py)
    FFN        'dense': one SwiGLU MLP                          (moe.py: SwiGLU)
               'moe'  : DeepSeekMoE, shared + routed experts    (moe.py: MoE)
    memory     Engram hashed n-gram lookup in chosen blocks     (engram.py)

`make_block_parts` is the single place where that choice is made, so train.py
and sample.py never need to know which parts a model has. The residual stream
is n streams wide (mhc.py: manifold-constrained hyper-connections), one by
default: then every hyper-connection is the plain residual x + F(x).
"""
import math
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli  # check_numbers: the checks every config's numbers get
from engram import Engram, EngramConfig, TokenizerCompression, table_params
from mhc import HyperConnection, MHCConfig, StreamCollapse, composite_amax_gain, expand_streams, stream_diversity
from mla import MLA, MLAConfig, apply_rope, rope_cos_sin
from moe import MoE, MoEConfig, SwiGLU


@dataclass
class GPTConfig:
    vocab_size: int = 8192       # set from the prepared data's meta.json
    block_size: int = 256        # longest context the model is trained on
    n_layer: int = 4             # transformer blocks
    n_head: int = 4              # attention heads
    n_embd: int = 128            # width of the residual stream
    ffn_hidden: int = 0          # dense SwiGLU width; 0 = 8/3 * n_embd rounded up to 32 (LLaMA's rule)
    rope_theta: float = 10000.0  # RoPE base
    attn: str = "mla"            # 'mha' | 'mla'
    ffn: str = "moe"             # 'dense' | 'moe'
    smear: bool = False          # the cheap trick nanochat uses: a gated share of the previous token's embedding added to each one
    value_embed_layers: tuple[int, ...] = ()  # blocks whose attention values get a token-embedding table of their own (nanochat, modded-nanogpt)
    mla: MLAConfig = field(default_factory=MLAConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    engram: EngramConfig = field(default_factory=EngramConfig)
    mhc: MHCConfig = field(default_factory=MHCConfig)

    def __post_init__(self):
        cli.check_numbers(self, at_least_1=("vocab_size", "block_size", "n_layer", "n_head", "n_embd"),
                          nonneg=("ffn_hidden",), positive=("rope_theta",),
                          one_of={"attn": ("mha", "mla"), "ffn": ("dense", "moe")})
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        # one order everywhere: Engram slot k is the k-th Engram block from the bottom
        self.engram.engram_layers = tuple(sorted(set(self.engram.engram_layers)))
        self.value_embed_layers = tuple(sorted(set(self.value_embed_layers)))
        for name, layers in (("engram_layers", self.engram.engram_layers), ("value_embed_layers", self.value_embed_layers)):
            bad = [i for i in layers if not 0 <= i < self.n_layer]
            if bad:
                raise ValueError(f"--{name}: {bad} outside 0..{self.n_layer - 1} (n_layer={self.n_layer})")

    @property
    def dense_hidden(self):
        return self.ffn_hidden or 32 * math.ceil(8 * self.n_embd / 3 / 32)

    @classmethod
    def from_dict(cls, d):
        """Inverse of asdict: sub-configs rebuilt, JSON lists back to tuples, unknown keys ignored."""
        return cli.config_from_dict(cls, d)


class CausalSelfAttention(nn.Module):
    """Plain multi-head attention with rotary positions; the 'mha' baseline.

    Its KV cache holds per-head K and V: 2 * n_embd numbers per token per layer,
    which is what MLA's latent cache is measured against.
    """

    def __init__(self, dim, n_heads, rope_theta=10000.0):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_theta = n_heads, dim // n_heads, rope_theta
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def cache_numbers_per_token(self):
        return 2 * self.n_heads * self.head_dim

    def forward(self, x, cache=None, start_pos=0, value_embed=None):
        B, T, C = x.shape
        q, k, v = self.wqkv(x).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)  # (B, T, H, D) each
        if value_embed is not None:  # (B, T, H, D): ValueEmbedding, off by default
            v = v + value_embed
        cos, sin = rope_cos_sin(torch.arange(start_pos, start_pos + T, device=x.device), self.head_dim, self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        S = k.size(2)
        if S == T:  # no earlier tokens: the usual causal mask
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # new token i (absolute position S - T + i) sees every key at position <= its own
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, C))


# -----------------------------------------------------------------------------
# Two cheap tricks other small models use where Engram uses a memory (compare.py's baselines; off by default).
# Both add token-identity features at almost no cost: smear a bigram feature at the input, value embeddings an
# identity part in some layers' attention values.

SMEAR_CHANNELS, VALUE_GATE_CHANNELS = 24, 32  # how many channels of x the two gates read (nanochat's choices)


class Smear(nn.Module):
    """nanochat's smear: x_t <- x_t + lambda * sigmoid(w . x_t[:24]) * x_{t-1}, the previous token's
    embedding mixed into the current one, gated by the current token: (B, T, C) -> (B, T, C). lambda starts
    at 0, so the model starts without it. A decode step takes x_{t-1} from the cache."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Linear(min(SMEAR_CHANNELS, dim), 1, bias=False)  # w
        self.scale = nn.Parameter(torch.zeros(1))  # lambda

    def forward(self, x, cache=None):
        first = x.new_zeros(x.shape[0], 1, x.shape[2]) if cache is None or cache.smear_prev is None \
            else cache.smear_prev  # (B, 1, C): nothing before the sequence
        before = torch.cat([first, x[:, :-1]], dim=1)  # (B, T, C)  x_{t-1}
        if cache is not None:
            cache.smear_prev = x[:, -1:]
        gate = self.scale * torch.sigmoid(self.gate(x[..., :self.gate.in_features]))  # (B, T, 1)
        return x + gate * before


class ValueEmbedding(nn.Module):
    """A token-embedding table of one block's own, added to its attention values (nanochat, modded-nanogpt):
    v_h,t <- v_h,t + g_h,t ve_h[id_t], with a per-head gate g = 2 sigmoid(W x_t[:32]) read from the
    attention's input, 1 at init (W = 0). Each value gets a part that only the token's identity sets.
    (B, T) ids and the attention's input (B, T, C) -> (B, T, H, d_v). In MLA it enters after W^UV."""

    def __init__(self, vocab_size: int, dim: int, n_heads: int, head_dim: int):
        super().__init__()
        self.n_heads = n_heads
        self.table = nn.Embedding(vocab_size, n_heads * head_dim)
        self.gate = nn.Linear(min(VALUE_GATE_CHANNELS, dim), n_heads, bias=False)

    def reset_parameters(self):  # after GPT.init_weights: the gate starts at exactly 1
        nn.init.zeros_(self.gate.weight)

    def forward(self, idx, x):
        gate = 2 * torch.sigmoid(self.gate(x[..., :self.gate.in_features]))  # (B, T, H)
        return gate[..., None] * self.table(idx).unflatten(-1, (self.n_heads, -1))  # (B, T, H, d_v)


def make_block_parts(cfg: GPTConfig, layer_id: int, n_canonical: int, table_device=None):
    """The one place that decides which attention, FFN and memory a block has.
    n_canonical: ids after Engram's tokenizer compression (its hash multipliers depend on it);
    table_device: where Engram's table is made ('meta': no memory, for rows that come from a file)."""
    if cfg.attn == "mla":
        attn = MLA(cfg.n_embd, cfg.n_head, cfg.mla, cfg.rope_theta)
    else:
        attn = CausalSelfAttention(cfg.n_embd, cfg.n_head, cfg.rope_theta)
    if cfg.ffn == "moe" and layer_id >= cfg.moe.n_dense_layers:
        ffn = MoE(cfg.n_embd, cfg.moe)
    else:
        ffn = SwiGLU(cfg.n_embd, cfg.dense_hidden)
    engram = None
    if layer_id in cfg.engram.engram_layers:
        engram = Engram(cfg.n_embd, cfg.engram, cfg.engram.engram_layers.index(layer_id), n_canonical,
                        cfg.mhc.hc_mult, table_device)
    # the residual connections around attention and the FFN: sublayers 2l and 2l + 1
    attn_hc, ffn_hc = (HyperConnection(cfg.n_embd, cfg.mhc, 2 * layer_id + k) for k in (0, 1))
    return attn, ffn, engram, attn_hc, ffn_hc


class Block(nn.Module):
    """Pre-norm block on n residual streams x (B, T, n, C) (mhc.py; n = 1 is the plain residual stream):
        x += Engram(x, context)                      added to every stream (Engram paper §2.1 placement)
        x  = H_res x + H_post^T Attn(norm(H_pre x))  the attention's hyper-connection
        x  = H_res x + H_post^T FFN(norm(H_pre x))   the FFN's"""

    def __init__(self, cfg: GPTConfig, layer_id: int, n_canonical: int, table_device=None):
        super().__init__()
        self.attn, self.ffn, self.engram, self.attn_hc, self.ffn_hc = make_block_parts(cfg, layer_id, n_canonical,
                                                                                         table_device)
        self.attn_norm = nn.RMSNorm(cfg.n_embd)
        self.ffn_norm = nn.RMSNorm(cfg.n_embd)
        self.last_diversity = None  # with n streams: mhc.stream_diversity of the last forward's output

    def forward(self, x, context=None, cache=None, start_pos=0, value_embed=None):
        # x (B, T, n, C); context (B, P+T) canonical ids for Engram (None in a model without it);
        # value_embed: the attention's input (B, T, C) -> this block's value embeddings (GPT.forward), or None
        if self.engram is not None and not self.engram.knockout:
            x = x + self.engram(x, context, None if cache is None else cache.setdefault("engram", {}))
        h, maps = self.attn_hc.read(x)  # (B, T, 1, C)
        h = self.attn_norm(h)[:, :, 0]  # (B, T, C)
        y = self.attn(h, None if cache is None else cache.setdefault("attn", {}), start_pos,
                      None if value_embed is None else value_embed(h))
        x = self.attn_hc.write(x, y, maps)
        h, maps = self.ffn_hc.read(x)
        x = self.ffn_hc.write(x, self.ffn(self.ffn_norm(h)[:, :, 0]), maps)
        if x.shape[2] > 1:
            self.last_diversity = stream_diversity(x)
        return x


class Cache:
    """Decoding state for one batch of sequences: a dict per layer plus the last
    few raw token ids that Engram's n-gram hash needs for the next token."""

    def __init__(self, n_layer):
        self.layers = [{} for _ in range(n_layer)]
        self.pos = 0             # tokens already processed
        self.engram_prefix = None  # (B, max_order - 1) ids before the next token
        self.smear_prev = None   # (B, 1, C) the last token's embedding (Smear)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, token_bytes=None, table_device=None):
        """token_bytes: each token id's raw bytes (data.Tokenizer.token_bytes()) for Engram's tokenizer
        compression; None = no compression table (e.g. when a checkpoint will bring it). table_device='meta':
        Engram's tables take no memory (sample.py, whose rows then come from a file: memory.offload_tables)."""
        super().__init__()
        self.cfg = cfg
        self.compression = None  # Engram's canonical ids, shared by all its layers
        if cfg.engram.engram_layers:
            self.compression = TokenizerCompression(cfg.engram, cfg.vocab_size, token_bytes)
        n_canonical = self.compression.n_canonical if self.compression else cfg.vocab_size
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i, n_canonical, table_device) for i in range(cfg.n_layer))
        self.collapse = StreamCollapse(cfg.mhc.hc_mult, cfg.n_embd, cfg.mhc)  # n streams -> 1 before the head
        self.norm = nn.RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying (Press & Wolf 2017)
        self.init_weights()
        # the cheap tricks, made and drawn last, so that every other weight is the model's without them
        self.smear = Smear(cfg.n_embd) if cfg.smear else None
        head_dim = cfg.mla.v_head_dim if cfg.attn == "mla" else cfg.n_embd // cfg.n_head
        self.value_embeds = nn.ModuleDict({str(i): ValueEmbedding(cfg.vocab_size, cfg.n_embd, cfg.n_head, head_dim)
                                           for i in cfg.value_embed_layers})
        for m in ([self.smear] if self.smear else []) + list(self.value_embeds.values()):
            self.init_weights(m)

    def init_weights(self, module=None):
        """N(0, 0.02) for every matrix (GPT-2) of module (the whole model by default), with residual output
        projections (attention's wo, the FFN's down projection w2) shrunk by 1/sqrt(2 * n_layer) so the
        residual stream's variance does not grow with depth. Modules with an init of their own (Engram's zero
        conv, a value embedding's gate) then apply it via reset_parameters()."""
        module = self if module is None else module
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                residual_out = name.endswith(("wo.weight", "w2.weight", ".w2"))
                std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if residual_out else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
        for m in module.modules():
            if isinstance(m, (Engram, ValueEmbedding)):
                m.reset_parameters()

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) token ids -> logits (B, T, vocab), loss (or None).

        With a Cache, idx holds only the new tokens; the cache supplies the rest."""
        B, T = idx.shape
        start_pos = 0 if cache is None else cache.pos
        if start_pos + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds block_size={self.cfg.block_size}")
        x = self.tok_emb(idx)  # (B, T, C)
        if self.smear is not None:
            x = self.smear(x, cache)
        x = expand_streams(x, self.cfg.mhc.hc_mult)  # (B, T, n, C): n copies of the embedding
        context = None
        if self.compression is not None:  # (B, P+T) what every Engram layer hashes
            context = self.compression(idx, None if cache is None else cache.engram_prefix)
        for i, block in enumerate(self.blocks):
            value_embed = self.value_embeds[str(i)] if str(i) in self.value_embeds else None
            x = block(x, context, None if cache is None else cache.layers[i], start_pos,
                      None if value_embed is None else partial(value_embed, idx))
        logits = self.lm_head(self.norm(self.collapse(x)))  # (B, T, vocab)
        if cache is not None:
            cache.pos += T
            if self.compression is not None:
                keep = max(self.cfg.engram.ngram_orders) - 1
                # -1 marks "before the sequence" (Engram reads it as its pad id), so the prefix
                # always holds keep columns, even after a one-token prompt
                prev = idx.new_full((B, keep), -1) if cache.engram_prefix is None else cache.engram_prefix
                cache.engram_prefix = torch.cat([prev, idx], dim=1)[:, idx.size(1):]
        loss = None
        if targets is not None:
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays, for gradcheck
            loss = F.cross_entropy(wide.flatten(0, 1), targets.flatten())
            loss = loss + self.aux_loss()
        return logits, loss

    def aux_loss(self):
        """Sum of the MoE layers' sequence-wise balance losses (zero when disabled)."""
        total = 0.0
        for m in self.modules():
            if isinstance(m, MoE):
                total = total + m.aux_loss
        return total

    def hc_amax_gain(self):
        """The Amax gain of the composite H_res over every hyper-connection, from the last forward (its max
        and mean over the tokens; mhc.composite_amax_gain); None with one stream."""
        if self.cfg.mhc.hc_mult == 1:
            return None
        return composite_amax_gain([hc.last_res for b in self.blocks for hc in (b.attn_hc, b.ffn_hc)])

    def hc_stream_diversity(self) -> dict | None:
        """{block: mhc.stream_diversity of its output streams} from the last forward; None with one stream."""
        if self.cfg.mhc.hc_mult == 1:
            return None
        return {str(i): round(b.last_diversity, 5) for i, b in enumerate(self.blocks) if b.last_diversity is not None}

    def update_router_biases(self):
        """Aux-loss-free balancing step for every MoE layer (call after optimizer.step()).
        Returns each MoE layer's load statistics, keyed by block index."""
        stats = {}
        for i, block in enumerate(self.blocks):
            if isinstance(block.ffn, MoE):
                stats[i] = block.ffn.update_bias()
        return stats

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """Sample max_new_tokens continuations of idx (B, T); yields each new (B, 1) token.

        The model sees the last block_size tokens at most, as nanoGPT crops its context. With
        use_cache that window is processed once and each later step feeds only the newest token;
        a full cache is rebuilt from the last block_size tokens (positions, Engram's n-gram tail
        and conv state restart with the window, as the crop is seen without a cache). Without
        use_cache each step re-runs the cropped context: the reference the cache is tested
        against. temperature=0 is greedy.
        """
        seq, cache = idx, None
        for _ in range(max_new_tokens):
            if not use_cache or cache is None or cache.pos == self.cfg.block_size:
                cache = Cache(self.cfg.n_layer) if use_cache else None
                step_input = seq[:, -self.cfg.block_size:]  # (B, <= block_size)
            logits, _ = self(step_input, cache=cache)
            logits = logits[:, -1, :].float()  # (B, vocab)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            seq, step_input = torch.cat([seq, nxt], dim=1), nxt
            yield nxt

    def configure_optimizers(self, learning_rate, weight_decay, betas, device_type="cpu"):
        """[AdamW] with weight decay on matrices only (norm gains and vectors are not decayed),
        [+ SparseAdam] (lazy Adam) for groups marked sparse, which then touches only the rows
        a batch looked up; train.py steps the list together. A module may ask for its own
        groups with custom_param_groups(): dicts with 'params', 'lr_mult', 'weight_decay' (None: the
        model's) and 'sparse' (Engram's tables: lr x 5, no decay; mHC's maps under --hc_lr_mult).
        lr_mult lets train.py's schedule scale each.
        """
        groups, sparse_groups, claimed = [], [], set()
        for m in self.modules():
            if m is not self and hasattr(m, "custom_param_groups"):
                for g in m.custom_param_groups():
                    decay = weight_decay if g["weight_decay"] is None else g["weight_decay"]  # None: the model's
                    (sparse_groups if g["sparse"] else groups).append({**g, "weight_decay": decay,
                                                                       "lr": learning_rate * g["lr_mult"]})
                    claimed.update(id(p) for p in g["params"])
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in claimed]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups += [
            {"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0, "lr": learning_rate},
            {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0, "lr": learning_rate},
        ]
        fused = device_type == "cuda"
        optimizers = [torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)]
        if sparse_groups:  # same betas and eps; SparseAdam has no weight decay (EngramConfig checks it is 0)
            # SparseAdam refuses a default lr of 0, though a group's may be 0: every group has its own lr (set
            # each step by train.py), so a placeholder stands in and --learning_rate=0 trains nothing (frozen)
            optimizers.append(torch.optim.SparseAdam(sparse_groups, lr=learning_rate or 1e-3, betas=betas))
        return optimizers

    def param_counts(self):
        """Parameter counts: total, active per token, and Engram tables.

        'active' counts what a token's forward pass multiplies with: routed
        experts a token is not sent to are excluded, and so are Engram table
        rows (a lookup, not a matmul, as in the paper's accounting), and value
        embedding tables (lookups too). The tied embedding is counted once, as the
        output head's matrix.
        """
        engrams = [m for m in self.modules() if isinstance(m, Engram)]
        tables = sum(m.n_table_params() for m in engrams)  # whole, wherever the rows live
        table_ids = {id(w) for m in engrams if (w := getattr(m.table, "weight", None)) is not None}
        total = sum(p.numel() for p in self.parameters() if id(p) not in table_ids) + tables
        inactive = sum(m.n_inactive_params() for m in self.modules() if isinstance(m, MoE))
        inactive += sum(m.table.weight.numel() for m in self.value_embeds.values())
        return {"total": total, "active": total - inactive - tables, "engram_tables": tables}


def step_bytes(cfg: GPTConfig, batch_size: int, device: str, dtype: str, tables_here=True, shards=1) -> dict:
    """From the config alone, before the model exists, about how many bytes of the device one training step
    holds, by the flag that sizes each part: {flag: bytes}. A low estimate, so that what it refuses surely
    cannot fit (cli.check_fits): fp32 weights with their gradient and two Adam moments (16 bytes a parameter,
    counted as param_counts would), the Engram tables (weights and Adam moments, 1/shards of them, unless they
    are kept in host memory: tables_here=False), the activations backward keeps (on a CPU or Apple GPU the
    attention's T x T scores too), and mHC's n streams and n x n maps (each Sinkhorn iteration's, kept for
    backward). dtype is --dtype: on a GPU anything but float32 keeps 16-bit activations."""
    moe, engram = cfg.moe, cfg.engram
    d, L, H, T, V, n = cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.block_size, cfg.vocab_size, cfg.mhc.hc_mult
    if cfg.attn == "mla":
        a = cfg.mla
        qk = H * (a.qk_nope_head_dim + a.qk_rope_head_dim)
        attn = (d * a.q_lora_rank + a.q_lora_rank * qk if a.q_lora_rank else d * qk) + \
            d * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * H * (a.qk_nope_head_dim + a.v_head_dim) + \
            H * a.v_head_dim * d
    else:
        attn = 4 * d * d
    n_moe = max(0, L - moe.n_dense_layers) if cfg.ffn == "moe" else 0
    experts = 3 * d * moe.moe_inter_dim * (moe.n_routed_experts + moe.n_shared_experts) + d * moe.n_routed_experts
    params = V * d + L * attn + n_moe * experts + (L - n_moe) * 3 * d * cfg.dense_hidden
    width = (moe.n_activated_experts + moe.n_shared_experts) * moe.moe_inter_dim if n_moe else cfg.dense_hidden
    tokens, cuda = batch_size * T, device.startswith("cuda")
    act = 2 if cuda and dtype != "float32" else 4  # bytes of an activation: autocast keeps 16-bit ones
    scores = 0 if cuda else H * T  # a GPU's fused attention never holds the T x T scores
    tables = table_params(engram) // shards * 4 * (3 if engram.engram_sparse else 4) \
        if tables_here and engram.engram_layers else 0
    return {"--n_embd (or --n_layer, --n_routed_experts, --moe_inter_dim)": 16 * params,
            "--engram_rows_per_head": tables,
            "--batch_size (or --block_size)": tokens * (act * L * (12 * d + 3 * width + scores) + 4 * 2 * V),
            "--hc_mult (or --hc_sinkhorn_iters)": 0 if n == 1 else
            4 * tokens * L * 2 * (4 * n * d + n * n * (2 * cfg.mhc.hc_sinkhorn_iters + 4))}


def dense_ffn_hidden(cfg: GPTConfig, target_active: int, multiple: int = 1) -> int:
    """ffn_hidden of a dense-FFN model like cfg whose active parameters come closest to
    target_active, rounded to a multiple. Active parameters grow linearly with the width
    (3 * n_embd per unit per layer), so two probes give the line and one solve the width."""
    def active(hidden):
        return GPT(replace(cfg, ffn="dense", ffn_hidden=hidden)).param_counts()["active"]
    a64, a128 = active(64), active(128)
    hidden = 64 + (target_active - a64) * 64 / (a128 - a64)
    return max(multiple, multiple * round(hidden / multiple))
