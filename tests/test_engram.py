"""Tests for engram.py: hashing, tokenizer compression, gating, short conv, decoding."""
import pytest
import torch

from engram import (Engram, EngramConfig, TokenizerCompression, build_canonical_ids, compression_reduction,
                    hash_multipliers, head_table_sizes, normalize_token, table_params)
from engram import hash_ngrams

V = 300  # small made-up vocabulary for the hashing tests


def small_cfg(**kw):
    base = dict(engram_layers=(1, 3), ngram_orders=(2, 3), engram_heads_per_order=4,
                engram_dim_per_order=16, engram_rows_per_head=101, engram_compress=False)
    base.update(kw)
    return EngramConfig(**base)


def naive_is_prime(n):  # independent of engram.is_prime: every divisor from 2 to n-1
    return n >= 2 and all(n % d for d in range(2, n))


class Hasher:
    """Every Engram layer's rows for some ids, as the model computes them: TokenizerCompression's
    canonical context, hashed with each layer's own multipliers and primes (engram.hash_ngrams)."""

    def __init__(self, cfg, vocab=V, token_bytes=None):
        self.cfg, self.compression = cfg, TokenizerCompression(cfg, vocab, token_bytes)
        self.layers = [Engram(32, cfg, slot, self.compression.n_canonical) for slot in range(len(cfg.engram_layers))]

    def __call__(self, ids, prefix=None):  # -> (L, B, T, H)
        context = self.compression(ids, prefix)
        return torch.stack([hash_ngrams(context, l.multipliers, l.head_primes, l.head_offsets, self.cfg.ngram_orders,
                                        self.cfg.engram_heads_per_order) for l in self.layers])


# ----------------------------------------------------------------------------- hashing

def test_head_sizes_are_distinct_primes_shared_by_hasher_and_layers():
    cfg = small_cfg()
    sizes = head_table_sizes(cfg)
    flat = [p for layer in sizes for p in layer]
    assert len(sizes) == 2 and all(len(layer) == 8 for layer in sizes)
    assert len(set(flat)) == len(flat)
    assert all(naive_is_prime(p) and p >= cfg.engram_rows_per_head for p in flat)
    for slot in range(2):
        layer = Engram(32, cfg, slot, V)
        assert layer.head_primes.tolist() == sizes[slot]
        assert layer.head_offsets.tolist() == [sum(sizes[slot][:h]) for h in range(8)]
        assert layer.table.num_embeddings == sum(sizes[slot])
    assert table_params(cfg) == 4 * sum(map(sum, sizes))  # head_dim = engram_dim_per_order / heads = 16 / 4


def reference_rows(hasher, ids):
    """The hash formula in plain Python integers, position by position."""
    canon = hasher.compression.canonical_ids.tolist()
    pad = int(hasher.compression.pad_id)
    orders, per_order = hasher.cfg.ngram_orders, hasher.cfg.engram_heads_per_order
    H = len(orders) * per_order
    out = torch.zeros(len(hasher.layers), *ids.shape, H, dtype=torch.long)
    for i, layer in enumerate(hasher.layers):
        mult = layer.multipliers.tolist()
        for b in range(ids.shape[0]):
            seq = [canon[c] for c in ids[b].tolist()]
            for t in range(len(seq)):
                for h in range(H):
                    mix = 0
                    for j in range(orders[h // per_order]):
                        mix ^= (seq[t - j] if t - j >= 0 else pad) * mult[j]
                    out[i, b, t, h] = mix % int(layer.head_primes[h]) + int(layer.head_offsets[h])
    return out


def test_hash_is_deterministic_and_matches_reference():
    cfg = small_cfg()
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    a, b = Hasher(cfg), Hasher(cfg)
    mult = hash_multipliers(cfg, a.compression.n_canonical)  # (L, max_order)
    assert torch.equal(mult, torch.stack([layer.multipliers for layer in a.layers]))
    assert torch.equal(a(ids), b(ids))
    assert torch.equal(a(ids), reference_rows(a, ids))
    assert (mult % 2 == 1).all()
    assert (mult < 2**62 // (a.compression.n_canonical + 1)).all()  # products cannot overflow
    assert not torch.equal(mult[0], mult[1])  # each layer its own hash
    assert not torch.equal(mult, hash_multipliers(small_cfg(engram_seed=1), a.compression.n_canonical))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_hash_same_on_cuda():
    hasher = Hasher(small_cfg())
    ids = torch.randint(0, V, (3, 40))
    cpu_rows = hasher(ids)
    hasher.compression.cuda()
    for layer in hasher.layers:
        layer.cuda()
    assert torch.equal(hasher(ids.cuda()).cpu(), cpu_rows)


def test_rows_stay_inside_their_head_range():
    hasher = Hasher(small_cfg(engram_rows_per_head=7))
    ids = torch.randint(0, V, (4, 50))
    prefix = torch.randint(-1, V, (4, 2))
    lo = torch.stack([layer.head_offsets for layer in hasher.layers])[:, None, None, :]
    hi = lo + torch.stack([layer.head_primes for layer in hasher.layers])[:, None, None, :]
    for rows in (hasher(ids), hasher(ids, prefix)):
        assert (rows >= lo).all() and (rows < hi).all()


def test_same_ngram_same_rows_at_any_position():
    hasher = Hasher(small_cfg())
    ids = torch.randint(0, V, (1, 40))
    ids[0, 5:8] = torch.tensor([11, 22, 33])
    ids[0, 30:33] = torch.tensor([11, 22, 33])
    rows = hasher(ids)  # (L, 1, T, H); heads 0..3 hash 2-grams, 4..7 hash 3-grams
    assert torch.equal(rows[:, 0, 7], rows[:, 0, 32])  # both orders end in the same n-gram
    assert torch.equal(rows[:, 0, 6, :4], rows[:, 0, 31, :4])  # the 2-gram (11, 22)


def test_earliest_token_of_ngram_changes_almost_all_heads():
    hasher = Hasher(small_cfg())
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (8, 30), generator=gen)
    s = 10
    changed = ids.clone()
    changed[:, s] = (ids[:, s] + torch.randint(1, V, (8,), generator=gen)) % V
    before, after = hasher(ids), hasher(changed)
    for i, n in enumerate(hasher.cfg.ngram_orders):
        heads = slice(4 * i, 4 * i + 4)
        t = s + n - 1  # the n-gram ending at t starts with the changed token
        frac = (before[:, :, t, heads] != after[:, :, t, heads]).float().mean()
        assert frac > 0.9, f"order {n}: only {frac:.2f} of heads changed"
        # an n-gram that does not contain position s is untouched
        assert torch.equal(before[:, :, t + 1:, heads], after[:, :, t + 1:, heads])
        assert torch.equal(before[:, :, :s, heads], after[:, :, :s, heads])


def test_prefix_continues_the_sequence():
    hasher = Hasher(small_cfg())
    ids = torch.randint(0, V, (2, 20))
    full = hasher(ids)
    for k in (2, 9, 19):
        assert torch.equal(hasher(ids[:, k:], ids[:, k - 2:k]), full[:, :, k:])
    # prefix ids < 0 mean "before the start": same as no prefix
    assert torch.equal(hasher(ids, torch.full((2, 2), -1)), full)
    assert torch.equal(hasher(ids[:, 1:], torch.stack([torch.full((2,), -1), ids[:, 0]], 1)), full[:, :, 1:])


# ----------------------------------------------------------------------------- compression

def test_compression_merges_variants_only():
    tokens = [" Hello", "hello", "HELLO", "Hello", "café", " Cafe", "cafe", "CAFÉ", "help",
              "hellp", " ", "\n", "\t\n  ", "  ", "ﬁne", "fine", "Ｈｅｌｌｏ", "world"]
    token_bytes = [t.encode("utf-8") for t in tokens] + [b"\xe2\x80", b"\xff", b"\x80"]
    canon = build_canonical_ids(token_bytes).tolist()
    c = dict(zip(tokens, canon))
    assert c[" Hello"] == c["hello"] == c["HELLO"] == c["Hello"] == c["Ｈｅｌｌｏ"]
    assert c["café"] == c[" Cafe"] == c["cafe"] == c["CAFÉ"]
    assert c[" "] == c["\n"] == c["\t\n  "] == c["  "]
    assert c["ﬁne"] == c["fine"]
    assert len({c["hello"], c["help"], c["hellp"], c["cafe"], c[" "], c["fine"], c["world"]}) == 7
    raw = canon[len(tokens):]  # invalid UTF-8: each keeps its own id
    assert len(set(raw)) == 3 and not set(raw) & set(canon[:len(tokens)])
    assert normalize_token(b"\xff") == b"\xff" and normalize_token(b" \t") == " "
    assert sorted(set(canon)) == list(range(len(set(canon))))  # dense ids
    assert compression_reduction(torch.tensor(canon)) == pytest.approx(1 - len(set(canon)) / len(canon))


def test_compression_on_gpt2_vocab():
    tiktoken = pytest.importorskip("tiktoken")
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as err:  # no cached BPE files and no network
        pytest.skip(f"GPT-2 encoding unavailable: {err}")
    token_bytes = [enc.decode_single_token_bytes(i) for i in range(enc.n_vocab)]
    hasher = TokenizerCompression(EngramConfig(engram_compress=True), enc.n_vocab, token_bytes)
    canon = hasher.canonical_ids
    one = lambda s: enc.encode(s)[0]  # noqa: E731  (all single GPT-2 tokens)
    assert canon[one(" Hello")] == canon[one("Hello")] == canon[one("hello")] == canon[one(" hello")]
    assert canon[one(" café")] == canon[one(" cafe")] == canon[one(" Café")]
    assert canon[one(" cat")] != canon[one(" car")]
    print(f"\nGPT-2 vocabulary: {enc.n_vocab} -> {hasher.n_canonical} canonical ids "
          f"(reduction {hasher.reduction:.1%})")
    assert 0.0 < hasher.reduction < 0.5
    assert hasher.reduction == pytest.approx(compression_reduction(canon))


def test_compression_off_is_identity():
    token_bytes = [b"a", b"A", b" a"]
    assert torch.equal(TokenizerCompression(small_cfg(engram_compress=False), 3, token_bytes).canonical_ids,
                       torch.arange(3))
    assert torch.equal(TokenizerCompression(small_cfg(engram_compress=True), 3, None).canonical_ids, torch.arange(3))
    assert TokenizerCompression(small_cfg(engram_compress=True), 3, token_bytes).n_canonical == 1


# ----------------------------------------------------------------------------- the layer

DIM = 32


def make_layer(gate=True, conv_std=0.0, seed=0):
    torch.manual_seed(seed)
    cfg = small_cfg(engram_layers=(1,), engram_gate=gate, engram_rows_per_head=53)
    hasher = TokenizerCompression(cfg, V)  # ids -> the canonical context the layer hashes
    layer = Engram(DIM, cfg, 0, hasher.n_canonical)
    with torch.no_grad():
        layer.table.weight.normal_(0.0, 1.0)  # large enough that outputs differ visibly
        if conv_std:  # a trained-looking conv, so the conv branch is really exercised
            layer.short_conv.conv.weight.normal_(0.0, conv_std)
    return hasher, layer


def inputs(B=2, T=24, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=gen), torch.randn(B, T, 1, DIM, generator=gen)  # one stream


def test_gate_in_open_unit_interval_and_grads_finite():
    hasher, layer = make_layer(conv_std=0.3)
    ids, h = inputs()
    h.requires_grad_()
    y = layer(h, hasher(ids))
    gate = layer.last_gate
    assert gate.shape == (*ids.shape, 1) and not gate.requires_grad
    assert (gate > 0).all() and (gate < 1).all()
    y.square().mean().backward()
    # context-aware: the same memory with another hidden state gets another gate
    layer(torch.randn_like(h), hasher(ids))
    assert not torch.allclose(layer.last_gate, gate)
    grads = [p.grad.coalesce().values() if p.grad.is_sparse else p.grad for p in layer.parameters()]
    assert layer.table.weight.grad.is_sparse and all(torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(h.grad).all()


def test_zero_conv_adds_nothing_at_init():
    hasher, layer = make_layer()
    ids, h = inputs()
    context = hasher(ids)
    rows = hash_ngrams(context, layer.multipliers, layer.head_primes, layer.head_offsets, (2, 3), 4)  # (B, T, H)
    # a model's generic init touches every weight; reset_parameters must re-zero the conv
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0.0, 0.02)
    layer.reset_parameters()
    assert (layer.short_conv.conv.weight == 0).all()
    y = layer(h, context)
    e = layer.table(rows).flatten(-2)
    assert torch.equal(y, layer.last_gate[..., None] * layer.value_proj(e)[:, :, None])
    # gate off: plain additive memory W_V e
    hasher, layer = make_layer(gate=False)
    y = layer(h, context)
    assert torch.equal(y, layer.value_proj(layer.table(rows).flatten(-2))[:, :, None]) and layer.last_gate is None


@pytest.mark.parametrize("gate", [True, False])
def test_causal_in_ids_and_hidden(gate):
    hasher, layer = make_layer(gate=gate, conv_std=0.3)
    ids, h = inputs()
    y = layer(h, hasher(ids))
    t = 11
    ids2, h2 = ids.clone(), h.clone()
    ids2[:, t + 1:] = (ids2[:, t + 1:] + 7) % V
    h2[:, t + 1:] += torch.randn_like(h2[:, t + 1:])
    y2 = layer(h2, hasher(ids2))
    assert torch.equal(y[:, :t + 1], y2[:, :t + 1])
    assert not torch.allclose(y[:, t + 1:], y2[:, t + 1:])
    # the conv carries an earlier change forward: perturbing the token at t moves later outputs
    ids3 = ids.clone()
    ids3[:, t] = (ids3[:, t] + 7) % V
    y3 = layer(h, hasher(ids3))
    assert torch.equal(y[:, :t], y3[:, :t]) and not torch.allclose(y[:, t + 9], y3[:, t + 9])


def test_incremental_decoding_equals_full_forward():
    hasher, layer = make_layer(conv_std=0.3)
    ids, h = inputs(T=20)
    full = layer(h, hasher(ids))
    P = hasher.max_order - 1
    cache, outs = {}, []
    prefill = 5
    outs.append(layer(h[:, :prefill], hasher(ids[:, :prefill]), cache))
    for t in range(prefill, ids.shape[1]):
        prefix = ids[:, t - P:t]
        outs.append(layer(h[:, t:t + 1], hasher(ids[:, t:t + 1], prefix), cache))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-6)
    # from the very first token, with "-1 = before the start" in the prefix
    cache, outs = {}, []
    for t in range(ids.shape[1]):
        prefix = torch.cat([torch.full((2, P), -1), ids[:, :t]], dim=1)[:, -P:]
        outs.append(layer(h[:, t:t + 1], hasher(ids[:, t:t + 1], prefix), cache))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-6)


def test_custom_param_groups_and_table_count():
    cfg = small_cfg(engram_lr_mult=5.0, engram_weight_decay=0.0)
    layer = Engram(DIM, cfg, 1, V)
    (group,) = layer.custom_param_groups()
    assert len(group["params"]) == 1 and group["params"][0] is layer.table.weight
    assert group["lr_mult"] == 5.0 and group["weight_decay"] == 0.0 and group["sparse"] == cfg.engram_sparse
    head_dim = cfg.engram_dim_per_order // cfg.engram_heads_per_order
    assert layer.n_table_params() == sum(head_table_sizes(cfg)[1]) * head_dim


# ----------------------------------------------------------------------------- the gate and the conv, by hand

def test_context_gate_matches_the_formula():
    """alpha = sigmoid(signed_sqrt(<k, h> / sqrt(d))) on values worked out by hand."""
    from engram import context_gate, signed_sqrt
    assert torch.equal(signed_sqrt(torch.tensor([-9.0, -0.25, 0.0, 4.0])), torch.tensor([-3.0, -0.5, 0.0, 2.0]))
    x = torch.tensor([0.0, 1e-12], requires_grad=True)
    signed_sqrt(x).sum().backward()
    assert torch.isfinite(x.grad).all()  # |x| clamped at eps: no infinite slope at 0
    k = torch.ones(2, 3, 4)  # d = 4, so <k, h> / sqrt(d) = 4 * h / 2: scores 4, -4, 0
    h = torch.tensor([2.0, -2.0, 0.0])[None, :, None].expand(2, 3, 4)
    gate = context_gate(k, h)
    assert gate.shape == (2, 3)
    torch.testing.assert_close(gate, torch.sigmoid(torch.tensor([2.0, -2.0, 0.0])).expand(2, 3))


def test_short_conv_is_a_causal_dilated_depthwise_conv():
    """y_t = SiLU(sum_k w_k RMSNorm(x)_{t - (K-1-k) d}) channel by channel, zeros before the start (a loop
    over the taps); fed in pieces through a cache, the same outputs."""
    from engram import ShortConv
    torch.manual_seed(0)
    B, T, n, dim, K, d = 2, 11, 2, 6, 3, 2
    conv = ShortConv(dim, K, d, n_streams=n)
    with torch.no_grad():
        conv.conv.weight.normal_()
        conv.norm.weight.uniform_(0.5, 1.5)
        x = torch.randn(B, T, n, dim)
        normed, w = conv.norm(x).flatten(2), conv.conv.weight[:, 0]  # (B, T, n*dim), (n*dim, K)
        expected = torch.zeros(B, T, n * dim)
        for t in range(T):
            for k in range(K):
                if t - (K - 1 - k) * d >= 0:
                    expected[:, t] += w[:, k] * normed[:, t - (K - 1 - k) * d]
        expected = torch.nn.functional.silu(expected).view(B, T, n, dim)
        torch.testing.assert_close(conv(x), expected)
        cache = {}
        pieces = [conv(x[:, a:b], cache) for a, b in ((0, 4), (4, 5), (5, 6), (6, T))]
        torch.testing.assert_close(torch.cat(pieces, dim=1), expected)


# ----------------------------------------------------------------------------- DeepSeek-V4.1's Engram

def test_v41_hash_rules_by_hand():
    """--engram_hash=v41: each layer's multipliers from numpy's default_rng(10007 x its block index), bounded
    by int64 max // V' // 2 and made odd; primes walked upward and never reused across layers (transformers'
    deepseek_v41 EngramLayout); the hash itself unchanged, checked here with Python's unbounded ints."""
    import numpy as np
    cfg = small_cfg(ngram_orders=(2, 3, 4), engram_heads_per_order=2, engram_dim_per_order=8,
                    engram_rows_per_head=10, engram_hash="v41", engram_short_conv=False)
    assert head_table_sizes(cfg) == [[11, 13, 17, 19, 23, 29], [31, 37, 41, 43, 47, 53]]  # layers 1 and 3
    n_canonical = 1000
    mult = hash_multipliers(cfg, n_canonical)  # (2 layers, 4)
    bound = (2**63 - 1) // n_canonical // 2
    for slot, block in enumerate((1, 3)):
        draw = np.random.default_rng(10007 * block).integers(0, bound, size=4, dtype=np.int64)
        assert mult[slot].tolist() == [2 * int(d) + 1 for d in draw]
    assert all(m % 2 == 1 and n_canonical * m < 2**63 for m in mult.flatten().tolist())  # the pad id times m fits
    assert not torch.equal(mult, hash_multipliers(small_cfg(ngram_orders=(2, 3, 4)), n_canonical))  # not the demo's

    c = [5, 999, 0, 1000]  # c_{t-3} ... c_t of one position; 1000 is the pad id (one past the last canonical id)
    primes = head_table_sizes(cfg)[0]
    offsets = [sum(primes[:i]) for i in range(len(primes))]
    m = mult[0].tolist()
    expected = []
    for k, n in enumerate((2, 3, 4)):
        h = 0
        for j in range(n):  # j = 0 the current token
            h ^= c[3 - j] * m[j]
        expected += [h % p + o for p, o in zip(primes[2 * k:2 * k + 2], offsets[2 * k:2 * k + 2])]
    rows = hash_ngrams(torch.tensor([c]), mult[0], torch.tensor(primes), torch.tensor(offsets), (2, 3, 4), 2)
    assert rows.flatten().tolist() == expected
    with pytest.raises(ValueError, match="--engram_seed=3: unused by --engram_hash=v41"):
        small_cfg(engram_hash="v41", engram_seed=3)
    with pytest.raises(ValueError, match="--engram_hash=v4: expected demo or v41"):
        small_cfg(engram_hash="v4")


def test_no_short_conv_is_the_gated_memory_alone_and_decodes_incrementally():
    torch.manual_seed(0)
    cfg = small_cfg(engram_layers=(1,), engram_rows_per_head=53, engram_short_conv=False)
    hasher = TokenizerCompression(cfg, V)
    layer = Engram(DIM, cfg, 0, hasher.n_canonical)
    assert layer.short_conv is None and not any("conv" in name for name, _ in layer.named_parameters())
    with torch.no_grad():
        layer.table.weight.normal_(0.0, 1.0)
    ids, h = inputs(T=12)
    y = layer(h, hasher(ids))
    e = layer.table.weight[hash_ngrams(hasher(ids), layer.multipliers, layer.head_primes, layer.head_offsets,
                                       cfg.ngram_orders, cfg.engram_heads_per_order)].flatten(-2)  # (B, T, d_mem)
    torch.testing.assert_close(y, layer.last_gate[..., None] * layer.value_proj(e)[:, :, None])  # Y = alpha W_V e
    cache, outs, P = {}, [], max(cfg.ngram_orders) - 1
    for t in range(ids.shape[1]):
        prefix = torch.cat([torch.full((2, P), -1), ids[:, :t]], dim=1)[:, -P:]
        outs.append(layer(h[:, t:t + 1], hasher(ids[:, t:t + 1], prefix), cache))
    torch.testing.assert_close(torch.cat(outs, dim=1), y)
