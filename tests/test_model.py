"""The assembled GPT: shapes, causality, KV-cache decoding, parameter groups and counts."""
import dataclasses
import itertools
import math

import pytest
import torch

from engram import EngramConfig
from mla import MLAConfig
from model import GPT, Cache, GPTConfig
from moe import MoEConfig

VOCAB = 97


def tiny_config(attn="mla", ffn="moe", engram=True, engram_sparse=False, **kw):
    return GPTConfig(
        vocab_size=VOCAB, block_size=32, n_layer=3, n_head=4, n_embd=32, attn=attn, ffn=ffn,
        mla=MLAConfig(q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),
        moe=MoEConfig(n_routed_experts=6, n_activated_experts=2, n_shared_experts=1, moe_inter_dim=16, n_dense_layers=1),
        engram=EngramConfig(engram_layers=(1,) if engram else (), engram_heads_per_order=2, engram_dim_per_order=16,
                            engram_rows_per_head=101, engram_sparse=engram_sparse),
        **kw)


def make_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = GPT(cfg)
    # Engram's conv starts at zero (identity); give it weights so the tests see the conv path too.
    for name, p in model.named_parameters():
        if "conv" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model.eval()


VARIANTS = list(itertools.product(["mha", "mla"], ["dense", "moe"], [False, True]))
# compare.py's baselines (model.Smear, model.ValueEmbedding), on both attentions, alone and with Engram
TRICKS = [dict(smear=True), dict(value_embed_layers=(0, 2)), dict(smear=True, value_embed_layers=(1,))]
TRICK_VARIANTS = [(attn, "moe", engram, kw) for attn in ("mha", "mla") for engram in (False, True) for kw in TRICKS]


def with_tricks_on(model):
    """The tricks start as no-ops (smear's lambda 0, the value gates 1): give them weights that matter."""
    for name, p in model.named_parameters():
        if name.startswith(("smear.", "value_embeds.")):
            torch.nn.init.normal_(p, std=0.3)
    return model


@pytest.mark.parametrize("attn,ffn,engram", VARIANTS)
def test_forward_shapes_and_loss(attn, ffn, engram):
    model = make_model(tiny_config(attn, ffn, engram))
    idx, targets = torch.randint(0, VOCAB, (2, 2, 20))
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 20, VOCAB)
    # An untrained model with small init predicts nearly uniformly.
    assert abs(loss.item() - math.log(VOCAB)) < 0.5


@pytest.mark.parametrize("attn,ffn,engram,tricks", [(*v, {}) for v in VARIANTS] + TRICK_VARIANTS)
def test_causality(attn, ffn, engram, tricks):
    """Changing tokens after position t changes no logits at or before t."""
    model = with_tricks_on(make_model(tiny_config(attn, ffn, engram, **tricks)))
    idx = torch.randint(0, VOCAB, (2, 24))
    t = 11
    changed = idx.clone()
    changed[:, t + 1:] = torch.randint(0, VOCAB, (2, 24 - t - 1))
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


@pytest.mark.parametrize("attn,ffn,engram,tricks", [(*v, {}) for v in VARIANTS] + TRICK_VARIANTS)
def test_incremental_decoding_equals_full_forward(attn, ffn, engram, tricks):
    """A prompt prefill followed by one token at a time gives the full forward's logits."""
    model = with_tricks_on(make_model(tiny_config(attn, ffn, engram, **tricks)))
    idx = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        cache = Cache(model.cfg.n_layer)
        steps = [model(idx[:, :5], cache=cache)[0]]
        for t in range(5, 20):
            steps.append(model(idx[:, t:t + 1], cache=cache)[0])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
    assert cache.pos == 20


@pytest.mark.parametrize("attn,ffn,engram", [("mha", "dense", False), ("mla", "moe", True)])
def test_greedy_generation_with_cache_equals_without(attn, ffn, engram):
    model = make_model(tiny_config(attn, ffn, engram))
    idx = torch.randint(0, VOCAB, (2, 4))
    with_cache = torch.cat(list(model.generate(idx, 20, temperature=0, use_cache=True)), dim=1)
    without = torch.cat(list(model.generate(idx, 20, temperature=0, use_cache=False)), dim=1)
    assert torch.equal(with_cache, without)


def test_generation_from_a_one_token_prompt():
    """Engram's n-gram tail must be padded when the prompt is shorter than the largest order."""
    model = make_model(tiny_config("mla", "moe", True))
    idx = torch.randint(0, VOCAB, (2, 1))
    with_cache = torch.cat(list(model.generate(idx, 10, temperature=0, use_cache=True)), dim=1)
    without = torch.cat(list(model.generate(idx, 10, temperature=0, use_cache=False)), dim=1)
    assert torch.equal(with_cache, without)


def test_engram_layers_in_any_order():
    """--engram_layers=2,1 is the same model as 1,2: each block gets its own table's rows."""
    cfg = tiny_config(engram=False)
    cfg.engram.engram_layers = (2, 1)
    cfg = GPTConfig.from_dict(dataclasses.asdict(cfg))
    assert cfg.engram.engram_layers == (1, 2)
    model = make_model(cfg)
    logits, _ = model(torch.randint(0, VOCAB, (2, 16)))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("attn,ffn,engram", [("mha", "dense", False), ("mla", "moe", True)])
@pytest.mark.parametrize("prompt_len", [4, 30, 45])  # 45: a prompt longer than block_size=32
def test_generation_past_block_size_slides_a_window(attn, ffn, engram, prompt_len):
    """Past block_size the model sees the last block_size tokens (nanoGPT's crop): the cached
    generation, which rebuilds its cache from that window, must pick the same greedy tokens as
    running the model on the cropped sequence from scratch at every step."""
    model = make_model(tiny_config(attn, ffn, engram))
    idx = torch.randint(0, VOCAB, (2, prompt_len))
    new = 60 - prompt_len + 10  # well past block_size
    cached = torch.cat(list(model.generate(idx, new, temperature=0, use_cache=True)), dim=1)
    seq = idx
    with torch.no_grad():
        for _ in range(new):
            logits, _ = model(seq[:, -model.cfg.block_size:])
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert cached.shape == (2, new)
    assert torch.equal(cached, seq[:, prompt_len:])


def test_param_counts():
    dense = make_model(tiny_config("mha", "dense", False)).param_counts()
    assert dense["active"] == dense["total"] and dense["engram_tables"] == 0
    moe = make_model(tiny_config("mla", "moe", True))
    counts = moe.param_counts()
    table = sum(m.table.weight.numel() for m in moe.modules() if hasattr(m, "n_table_params"))
    assert counts["engram_tables"] == table > 0
    # Routed experts a token skips: 2 MoE layers * 6 experts * 3 matrices * 16*32, times (1 - 2/6).
    routed = 2 * 6 * 3 * 16 * 32
    assert counts["active"] == counts["total"] - table - routed * 4 // 6


def test_optimizer_groups():
    model = make_model(tiny_config("mla", "moe", True))
    (opt,) = model.configure_optimizers(1e-3, 0.1, (0.9, 0.95))  # dense tables: one AdamW for everything
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    tables = {id(m.table.weight) for m in model.modules() if hasattr(m, "n_table_params")}
    for g in opt.param_groups:
        ids = {id(p) for p in g["params"]}
        if ids & tables:
            assert ids == tables and g["lr_mult"] == 5.0 and g["weight_decay"] == 0.0
            assert g["lr"] == pytest.approx(5e-3)
        elif g["weight_decay"] > 0:
            assert all(p.dim() >= 2 for p in g["params"])  # only matrices decay
        else:
            assert all(p.dim() < 2 for p in g["params"])


def test_config_round_trip():
    cfg = tiny_config()
    assert GPTConfig.from_dict(dataclasses.asdict(cfg)) == cfg


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="attn"):
        GPTConfig(attn="gqa")
    with pytest.raises(ValueError, match="engram_layers"):
        GPTConfig(n_layer=2, engram=EngramConfig(engram_layers=(5,)))
    with pytest.raises(ValueError, match="score_func"):
        MoEConfig(score_func="relu")
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        MLAConfig(qk_rope_head_dim=7)
    with pytest.raises(ValueError, match="ngram_orders"):
        EngramConfig(ngram_orders=())


def test_sparse_tables_go_to_lazy_adam():
    """With engram_sparse the tables get a second optimizer, SparseAdam (lazy Adam): lr x 5, and a step moves
    only the rows whose gradient it holds. AdamW has every other parameter, each exactly once."""
    model = make_model(tiny_config("mla", "moe", True, engram_sparse=True))
    adamw, lazy = model.configure_optimizers(1e-3, 0.1, (0.9, 0.95))
    assert type(adamw) is torch.optim.AdamW and type(lazy) is torch.optim.SparseAdam
    table = model.blocks[1].engram.table.weight
    assert [p for g in lazy.param_groups for p in g["params"]] == [table]
    assert lazy.param_groups[0]["lr"] == pytest.approx(5e-3) and lazy.param_groups[0]["lr_mult"] == 5.0
    assert lazy.defaults["betas"] == adamw.defaults["betas"] == (0.9, 0.95)
    dense = [id(p) for g in adamw.param_groups for p in g["params"]]
    assert len(dense) == len(set(dense)) and set(dense) == {id(p) for p in model.parameters()} - {id(table)}
    before = table.detach().clone()
    table.grad = torch.sparse_coo_tensor(torch.tensor([[3, 50, 3]]), torch.randn(3, table.shape[1]), table.shape,
                                         check_invariants=True)
    lazy.step()
    assert (table.detach() != before).any(dim=1).nonzero().flatten().tolist() == [3, 50]


def test_the_tricks_are_off_by_default_and_start_as_no_ops():
    """Off by default (no parameter more); on, they start as the model without them: smear's lambda is 0 and
    a value embedding's gate 1, so at init only the value tables' own values add to the output. Every other
    weight is drawn as in the model without them (they are made last)."""
    def build(**kw):
        torch.manual_seed(0)
        return GPT(tiny_config(**kw)).eval()
    plain = build()
    assert plain.smear is None and len(plain.value_embeds) == 0
    smeared = build(smear=True)
    idx = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert torch.equal(smeared(idx)[0], plain(idx)[0])
    valued = build(value_embed_layers=(1,))
    assert torch.equal(valued.value_embeds["1"].gate.weight, torch.zeros_like(valued.value_embeds["1"].gate.weight))
    shared = {k: v for k, v in valued.state_dict().items() if not k.startswith("value_embeds.")}
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in shared.items())
    counts, base = valued.param_counts(), plain.param_counts()
    table = valued.value_embeds["1"].table.weight.numel()
    assert counts["total"] - base["total"] == table + valued.value_embeds["1"].gate.weight.numel()
    assert counts["active"] - base["active"] == valued.value_embeds["1"].gate.weight.numel()  # the table: a lookup
