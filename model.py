"""The GPT that ties nano-engram together.

A decoder-only transformer in the nanoGPT mould (pre-norm blocks, tied token
embedding and output head), in which three parts are chosen by config:

    attention  'mha' : multi-head attention with RoPE          (this file)
               'mla' : Multi-head Latent Attention             (mla.py)
    FFN        'dense': one SwiGLU MLP                          (moe.py: SwiGLU)
               'moe'  : DeepSeekMoE, shared + routed experts    (moe.py: MoE)
    memory     Engram hashed n-gram lookup in chosen blocks     (engram.py)

`make_block_parts` is the single place where that choice is made, so train.py
and sample.py never need to know which parts a model has.
"""
import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from engram import Engram, EngramConfig, EngramHasher
from mla import MLA, MLAConfig, apply_rope, rope_cos_sin
from moe import MoE, MoEConfig, SwiGLU


@dataclass
class GPTConfig:
    vocab_size: int = 8192       # set from the prepared data's meta.json
    block_size: int = 256        # longest context the model is trained on
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    ffn_hidden: int = 0          # dense SwiGLU width; 0 = 8/3 * n_embd rounded up to 32 (LLaMA's rule)
    rope_theta: float = 10000.0
    attn: str = "mla"            # 'mha' | 'mla'
    ffn: str = "moe"             # 'dense' | 'moe'
    kernels: str = "auto"        # 'auto' | 'triton' | 'torch': Triton kernels (kernels.py) on CUDA when available
    mla: MLAConfig = field(default_factory=MLAConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    engram: EngramConfig = field(default_factory=EngramConfig)

    def __post_init__(self):
        if self.attn not in ("mha", "mla"):
            raise ValueError(f"attn must be 'mha' or 'mla', got {self.attn!r}")
        if self.ffn not in ("dense", "moe"):
            raise ValueError(f"ffn must be 'dense' or 'moe', got {self.ffn!r}")
        if self.kernels not in kernels.KERNEL_MODES:
            raise ValueError(f"kernels must be one of {', '.join(kernels.KERNEL_MODES)}, got {self.kernels!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        # one order everywhere: Engram slot k is the k-th Engram block from the bottom
        self.engram.engram_layers = tuple(sorted(set(self.engram.engram_layers)))
        bad = [i for i in self.engram.engram_layers if not 0 <= i < self.n_layer]
        if bad:
            raise ValueError(f"engram_layers {bad} are outside 0..{self.n_layer - 1} (n_layer={self.n_layer})")

    @property
    def dense_hidden(self):
        return self.ffn_hidden or 32 * math.ceil(8 * self.n_embd / 3 / 32)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Inverse of to_dict (nested sub-configs; JSON turns tuples into lists)."""
        sub = {"mla": MLAConfig, "moe": MoEConfig, "engram": EngramConfig}
        kwargs = {}
        for f in fields(cls):
            if f.name not in d:
                continue
            v = d[f.name]
            if f.name in sub:
                sub_cls = sub[f.name]
                v = sub_cls(**{k: tuple(x) if isinstance(x, list) else x for k, x in v.items()})
            kwargs[f.name] = v
        return cls(**kwargs)


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

    def forward(self, x, cache=None, start_pos=0):
        B, T, C = x.shape
        q, k, v = self.wqkv(x).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)  # (B, T, H, D) each
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


def make_block_parts(cfg: GPTConfig, layer_id: int):
    """The one place that decides which attention, FFN and memory a block has."""
    if cfg.attn == "mla":
        attn = MLA(cfg.n_embd, cfg.n_head, cfg.mla, cfg.rope_theta, kernel_mode=cfg.kernels)
    else:
        attn = CausalSelfAttention(cfg.n_embd, cfg.n_head, cfg.rope_theta)
    if cfg.ffn == "moe" and layer_id >= cfg.moe.n_dense_layers:
        ffn = MoE(cfg.n_embd, cfg.moe, kernel_mode=cfg.kernels)
    else:
        ffn = SwiGLU(cfg.n_embd, cfg.dense_hidden)
    engram = None
    if layer_id in cfg.engram.engram_layers:
        engram = Engram(cfg.n_embd, cfg.engram, cfg.engram.engram_layers.index(layer_id))
    return attn, ffn, engram


class Block(nn.Module):
    """Pre-norm block: h += Engram(h) (paper §2.1 placement); h += Attn(norm h); h += FFN(norm h)."""

    def __init__(self, cfg: GPTConfig, layer_id: int):
        super().__init__()
        self.attn, self.ffn, self.engram = make_block_parts(cfg, layer_id)
        self.attn_norm = nn.RMSNorm(cfg.n_embd)
        self.ffn_norm = nn.RMSNorm(cfg.n_embd)

    def forward(self, x, engram_memory=None, cache=None, start_pos=0):
        if self.engram is not None:
            x = x + self.engram(x, engram_memory.get("rows"), None if cache is None else cache.setdefault("engram", {}),
                                memory=engram_memory.get("memory"))
        x = x + self.attn(self.attn_norm(x), None if cache is None else cache.setdefault("attn", {}), start_pos)
        return x + self.ffn(self.ffn_norm(x))


class Cache:
    """Decoding state for one batch of sequences: a dict per layer plus the last
    few raw token ids that Engram's n-gram hash needs for the next token."""

    def __init__(self, n_layer):
        self.layers = [{} for _ in range(n_layer)]
        self.pos = 0             # tokens already processed
        self.engram_prefix = None  # (B, max_order - 1) ids before the next token


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, token_bytes=None):
        """token_bytes: raw bytes of each token id, for Engram's tokenizer
        compression (data.Tokenizer.token_bytes()); None = no compression table
        (e.g. when it will be loaded from a checkpoint anyway)."""
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying (Press & Wolf 2017)
        self.engram_hasher = None
        if cfg.engram.engram_layers:
            self.engram_hasher = EngramHasher(cfg.engram, cfg.vocab_size, token_bytes)
        self.init_weights()

    def init_weights(self):
        """N(0, 0.02) for every matrix (GPT-2), with residual output projections
        (attention's wo, the FFN's down projection w2) shrunk by 1/sqrt(2 * n_layer)
        so the residual stream's variance does not grow with depth. Modules with an
        init of their own (Engram's zero conv) then apply it via reset_parameters()."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                residual_out = name.endswith(("wo.weight", "w2.weight", ".w2"))
                std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if residual_out else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
        for m in self.modules():
            if isinstance(m, Engram):
                m.reset_parameters()

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) token ids -> logits (B, T, vocab), loss (or None).

        With a Cache, idx holds only the new tokens; the cache supplies the rest."""
        B, T = idx.shape
        start_pos = 0 if cache is None else cache.pos
        if start_pos + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds block_size={self.cfg.block_size}")
        x = self.tok_emb(idx)  # (B, T, C)
        memories = self.engram_memories(idx, None if cache is None else cache.engram_prefix)
        for i, block in enumerate(self.blocks):
            x = block(x, memories.get(i), None if cache is None else cache.layers[i], start_pos)
        logits = self.lm_head(self.norm(x))  # (B, T, vocab)
        if cache is not None:
            cache.pos += T
            if self.engram_hasher is not None:
                keep = max(self.cfg.engram.ngram_orders) - 1
                # -1 marks "before the sequence" (Engram reads it as its pad id), so the prefix
                # always holds keep columns, even after a one-token prompt
                prev = idx.new_full((B, keep), -1) if cache.engram_prefix is None else cache.engram_prefix
                cache.engram_prefix = torch.cat([prev, idx], dim=1)[:, idx.size(1):]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            loss = loss + self.aux_loss()
        return logits, loss

    def engram_memories(self, idx, prefix):
        """What each Engram block looks up, hashed once per forward for all of them.

        PyTorch: the hash rows of every Engram layer at once ({"rows": (B, T, heads)}
        per block). Triton: one fused hash-and-gather kernel per layer returns the
        memory vector e_t itself ({"memory": (B, T, d_mem)})."""
        if self.engram_hasher is None:
            return {}
        blocks = [i for i, b in enumerate(self.blocks) if b.engram is not None]
        h = self.engram_hasher
        if kernels.use_triton(self.cfg.kernels, idx.device):
            context = h.canonical_context(idx, prefix)  # (B, max_order - 1 + T) canonical ids
            return {i: {"memory": kernels.engram_lookup(
                context, h.multipliers[slot], h.head_primes[slot], h.head_offsets[slot], h.ngram_orders,
                h.heads_per_order, self.blocks[i].engram.table.weight, self.cfg.kernels)}
                for slot, i in enumerate(blocks)}
        rows = h(idx, prefix)  # (n_engram_layers, B, T, heads)
        return {i: {"rows": rows[slot]} for slot, i in enumerate(blocks)}

    def aux_loss(self):
        """Sum of the MoE layers' sequence-wise balance losses (zero when disabled)."""
        total = 0.0
        for m in self.modules():
            if isinstance(m, MoE):
                total = total + m.aux_loss
        return total

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

        With use_cache the prompt is processed once and every later step feeds
        only the newest token. Without it, every step re-runs the whole context
        (the reference the cache is tested against). temperature=0 is greedy.
        """
        if idx.size(1) + max_new_tokens > self.cfg.block_size:
            raise ValueError(f"prompt ({idx.size(1)} tokens) + max_new_tokens ({max_new_tokens}) "
                             f"exceeds block_size={self.cfg.block_size}")
        cache = Cache(self.cfg.n_layer) if use_cache else None
        seq, step_input = idx, idx
        for _ in range(max_new_tokens):
            logits, _ = self(step_input if use_cache else seq, cache=cache)
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

    def configure_optimizer(self, learning_rate, weight_decay, betas, device_type="cpu"):
        """AdamW with weight decay on matrices only (norm gains and vectors are not decayed).

        A module may ask for its own groups by defining custom_param_groups(),
        returning dicts with 'params', 'lr_mult' and 'weight_decay' (Engram's
        tables: 5x learning rate, no decay, as in the paper). Every group
        carries lr_mult so train.py's schedule can scale it.
        """
        groups, claimed = [], set()
        for m in self.modules():
            if m is not self and hasattr(m, "custom_param_groups"):
                for g in m.custom_param_groups():
                    groups.append({**g, "lr": learning_rate * g["lr_mult"]})
                    claimed.update(id(p) for p in g["params"])
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in claimed]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups += [
            {"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0, "lr": learning_rate},
            {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0, "lr": learning_rate},
        ]
        fused = device_type == "cuda"
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def param_counts(self):
        """Parameter counts: total, active per token, and Engram tables.

        'active' counts what a token's forward pass multiplies with: routed
        experts a token is not sent to are excluded, and so are Engram table
        rows (a lookup, not a matmul, as in the paper's accounting). The tied
        embedding is counted once, as the output head's matrix.
        """
        total = sum(p.numel() for p in self.parameters())
        inactive = sum(m.n_inactive_params() for m in self.modules() if isinstance(m, MoE))
        tables = sum(m.n_table_params() for m in self.modules() if isinstance(m, Engram))
        return {"total": total, "active": total - inactive - tables, "engram_tables": tables}
