"""mHC (mhc.py): the Sinkhorn projection, the hyper-connection maps, one stream = the plain model bit for
bit, the composite map's Amax gain with and without the constraint, gradients (float64 gradcheck), the
streams' symmetry breaking, Engram on n streams, cached decoding, resume and the Triton path with n = 4."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import engram
import kernels
import train
from engram import Engram, TokenizerCompression, context_gate
from mhc import (HyperConnection, MHCConfig, StreamCollapse, amax_gain, composite_amax_gain, sinkhorn,
                 sinkhorn_softmax_start)
from model import GPT, Cache
from scripts import run
from test_engram import V, small_cfg
from test_model import VOCAB, make_model, tiny_config
from test_train import TINY, data_flags, read_log, whole_and_resumed


def hc_config(n=4, **kw):
    return tiny_config(mhc=MHCConfig(hc_mult=n, **kw))


def perturb_maps(model, std, seed=0):
    """Move every hyper-connection's static maps and scales away from their init, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, HyperConnection) and m.n > 1:
                m.bias.add_(std * torch.randn(m.bias.shape, generator=gen))
                m.scale.fill_(1.0)


# ----------------------------------------------------------------------------- the projection

def test_mhc_sinkhorn_is_doubly_stochastic_and_converges():
    logits = torch.randn(64, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for iters in (1, 3, 10, 30):
        m = sinkhorn(logits, iters, eps=0.0)
        assert (m >= 0).all()
        torch.testing.assert_close(m.sum(-1), torch.ones(64, 4, dtype=torch.float64))  # rows: the last pass
        errors.append(float((m.sum(-2) - 1).abs().max()))  # columns: what is left
    assert errors[0] > errors[1] > errors[2] > errors[3] and errors[3] < 1e-9, errors
    # a wider spread of logits converges more slowly: 20 iterations (the paper's t_max) leave ~1e-2 at std 2
    assert 1e-4 < float((sinkhorn(2 * logits, 20, eps=0.0).sum(-2) - 1).abs().max()) < 3e-2
    # a doubly stochastic matrix neither amplifies nor shrinks: Amax gain 1
    assert torch.allclose(amax_gain(sinkhorn(logits, 50, eps=0.0)), torch.ones(64, dtype=torch.float64), atol=1e-9)


def test_mhc_res_map_conserves_the_mean_over_streams():
    """Columns summing to 1 keep the streams' mean through the mix; on maps far from the identity too."""
    torch.manual_seed(0)
    hc = HyperConnection(16, MHCConfig(hc_mult=4, hc_init_scale=0.1), sublayer=1).double()
    with torch.no_grad():
        hc.bias[8:].normal_(0.0, 1.0)  # b_res: a static mix far from the identity
    x = torch.randn(3, 5, 4, 16, dtype=torch.float64)
    _, h_post, h_res = hc.maps(x)
    mixed = torch.matmul(h_res, x)  # (B, T, n, C): what the write keeps of the streams
    torch.testing.assert_close(mixed.mean(dim=2), x.mean(dim=2), atol=1e-5, rtol=1e-5)
    assert (h_res >= 0).all() and not torch.allclose(h_res, torch.eye(4, dtype=h_res.dtype).expand_as(h_res), atol=0.1)
    assert ((h_post > 0) & (h_post < 2)).all()


@pytest.mark.parametrize("flags, message", [
    (dict(hc_sinkhorn_start="sigmoid"), "--hc_sinkhorn_start=sigmoid: expected exp or softmax"),
    (dict(hc_sinkhorn_start="softmax", hc_sinkhorn_iters=0), "--hc_sinkhorn_start=softmax: needs"),
    (dict(hc_pre_eps="yes"), "--hc_pre_eps=yes: expected true or false"),
    (dict(hc_collapse="mean"), "--hc_collapse=mean: expected static or dynamic"),
])
def test_mhc_v4_options_are_checked(flags, message):
    """DeepSeek-V4's variants (tests/test_parity.py checks them against transformers): bad values are errors."""
    with pytest.raises(ValueError, match=message):
        MHCConfig(hc_mult=4, **flags)


def test_mhc_softmax_start_is_doubly_stochastic_and_dynamic_collapse_starts_at_the_mean():
    logits = torch.randn(64, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m = sinkhorn_softmax_start(logits, 30, eps=0.0)
    torch.testing.assert_close(m.sum(-1), torch.ones(64, 4, dtype=torch.float64))
    torch.testing.assert_close(m, sinkhorn(logits, 30, eps=0.0))  # without eps, the same passes
    collapse = StreamCollapse(4, 16, MHCConfig(hc_mult=4, hc_collapse="dynamic", hc_init_scale=0.0))
    x = torch.randn(2, 5, 4, 16)
    torch.testing.assert_close(collapse(x), x.mean(dim=2))
    assert StreamCollapse(1, 16, MHCConfig(hc_collapse="dynamic"))(x[:, :, :1]).equal(x[:, :, 0])


# ----------------------------------------------------------------------------- one stream is the plain model

def plain_forward(model, idx, targets):
    """The model as it was before mHC: one residual stream, x + F(norm x) around every sublayer."""
    x, context = model.tok_emb(idx), model.compression(idx)
    for block in model.blocks:
        if block.engram is not None:
            x = x + block.engram(x[:, :, None], context)[:, :, 0]
        x = x + block.attn(block.attn_norm(x))
        x = x + block.ffn(block.ffn_norm(x))
    logits = model.lm_head(model.norm(x))
    return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def test_mhc_one_stream_is_the_plain_model_bit_for_bit():
    model = make_model(tiny_config()).train()  # hc_mult = 1, the default
    assert not any(isinstance(p, torch.nn.Parameter) for m in model.modules() if isinstance(m, HyperConnection)
                   for p in m.parameters())  # nothing to learn with one stream
    idx, targets = torch.randint(0, VOCAB, (2, 2, 20))
    logits, loss = model(idx, targets)
    ref_logits, ref_loss = plain_forward(model, idx, targets)
    assert torch.equal(logits, ref_logits) and torch.equal(loss, ref_loss)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-6)
    assert model.hc_amax_gain() is None


def test_mhc_engram_on_one_stream_is_todays_engram():
    """Engram's §2 on one stream: alpha = sigmoid(signed_sqrt(<RMSNorm(W_K e), RMSNorm(h)> / sqrt(d))),
    Y = alpha W_V e + SiLU(conv(RMSNorm(alpha W_V e))), computed here from the layer's own weights."""
    torch.manual_seed(0)
    cfg = small_cfg(engram_layers=(1,), engram_rows_per_head=53)
    hasher = TokenizerCompression(cfg, V)
    layer = Engram(32, cfg, 0, hasher.n_canonical)
    torch.nn.init.normal_(layer.short_conv.conv.weight, std=0.3)
    ids, h = torch.randint(0, V, (2, 24)), torch.randn(2, 24, 32)
    context = hasher(ids)
    e = engram.lookup(context, layer.multipliers, layer.head_primes, layer.head_offsets,
                                        cfg.ngram_orders, cfg.engram_heads_per_order, layer.table.weight)
    rms = lambda x, w: F.rms_norm(x, (32,), w)  # noqa: E731
    gate = context_gate(rms(layer.key_proj(e), layer.key_norm.weight), rms(h, layer.hidden_norm.weight))
    value = gate[..., None] * layer.value_proj(e)  # (B, T, C)
    conv = layer.short_conv
    normed = F.pad(rms(value, conv.norm.weight).transpose(1, 2), (conv.context, 0))  # causal: zeros before
    expected = value + F.silu(conv.conv(normed).transpose(1, 2))
    torch.testing.assert_close(layer(h[:, :, None], context)[:, :, 0], expected, atol=1e-6, rtol=1e-6)


def test_mhc_engram_on_identical_streams_gives_each_the_one_stream_output():
    """n = 4 with every stream's weights copied from a one-stream layer, on 4 copies of one hidden state:
    each stream's gate and output are the one-stream layer's (the table and W_V are shared)."""
    torch.manual_seed(0)
    cfg = small_cfg(engram_layers=(1,), engram_rows_per_head=53)
    hasher = TokenizerCompression(cfg, V)
    one, four = Engram(32, cfg, 0, hasher.n_canonical), Engram(32, cfg, 0, hasher.n_canonical, n_streams=4)
    torch.nn.init.normal_(one.short_conv.conv.weight, std=0.3)
    with torch.no_grad():
        for name, p in four.named_parameters():
            q = dict(one.named_parameters())[name]
            p.copy_(q if p.shape == q.shape else q.repeat(4, *([1] * (q.dim() - 1))))
    ids, h = torch.randint(0, V, (2, 24)), torch.randn(2, 24, 1, 32)
    y1, y4 = one(h, hasher(ids)), four(h.expand(-1, -1, 4, -1), hasher(ids))
    torch.testing.assert_close(y4, y1.expand_as(y4), atol=1e-6, rtol=1e-6)
    assert four.last_gate.shape == (2, 24, 4)


def test_mhc_cpu_preset_keeps_its_model_with_one_stream():
    """hc_mult = 1 adds no parameter: the CPU preset's names and shapes are what they were (old checkpoints load)."""
    cfg = train.config(["--preset=cpu", "--device=cpu", "--engram_rows_per_head=65536"]).model
    model = GPT(dataclasses.replace(cfg, vocab_size=500))
    assert not [n for n, _ in model.named_parameters() if "hc" in n or "collapse" in n]
    four = GPT(dataclasses.replace(cfg, vocab_size=500, mhc=MHCConfig(hc_mult=4)))
    assert {n.split(".")[-2] for n, _ in four.named_parameters() if "_hc." in n} == {"attn_hc", "ffn_hc", "phi"}


# ----------------------------------------------------------------------------- the constraint at work

def test_mhc_composite_amax_gain_stays_near_one_while_unconstrained_hc_grows():
    idx = torch.randint(0, VOCAB, (2, 16))
    gains = {}
    for iters in (20, 0):
        model = make_model(hc_config(n=4, hc_sinkhorn_iters=iters))
        perturb_maps(model, std=0.5)  # the same perturbation of both models' static maps
        with torch.no_grad():
            model(idx)
        gains[iters] = model.hc_amax_gain()
    assert gains[20]["max"] <= 1 + 1e-2  # doubly stochastic up to Sinkhorn's last column error
    assert gains[0]["max"] > 1.5  # six unconstrained maps compound
    hc = next(m for m in model.modules() if isinstance(m, HyperConnection))
    assert hc.last_res.shape == (2, 16, 4, 4)
    # composite_amax_gain multiplies in forward order: two maps that undo each other give 1
    a = torch.tensor([[2.0, 0.0], [0.0, 0.5]]).expand(1, 1, 2, 2)
    assert composite_amax_gain([a, torch.linalg.inv(a)])["max"] == pytest.approx(1.0)


def test_mhc_gradcheck_float64_two_streams():
    """The gradients of a tiny two-stream model (attention, FFN, Engram) with respect to every mHC
    parameter, against finite differences."""
    cfg = dataclasses.replace(tiny_config("mha", "dense"), n_layer=2, n_embd=8, n_head=2, block_size=8,
                              mhc=MHCConfig(hc_mult=2, hc_init_scale=0.5))
    cfg.engram.engram_dim_per_order = 8
    model = make_model(cfg).double()
    perturb_maps(model, std=0.3)
    names = [n for n, _ in model.named_parameters() if "_hc." in n or "collapse" in n]
    params = dict(model.named_parameters())
    idx, targets = torch.randint(0, VOCAB, (2, 1, 6))

    def loss_of(*values):
        return torch.func.functional_call(model, {**params, **dict(zip(names, values))}, (idx, targets))[1]
    inputs = tuple(params[n].detach().clone().requires_grad_() for n in names)
    assert len(inputs) == 2 * 2 * 3 + 1  # phi, scale, bias of 4 hyper-connections, and the collapse
    assert torch.autograd.gradcheck(loss_of, inputs, eps=1e-6, atol=1e-5)


def test_mhc_streams_differ_after_a_few_steps(prepared, tmp_path):
    """The streams enter as copies. With --hc_init=mhc only the random phi makes each block's writes differ,
    by a few percent at most; the default (spread) writes unequal gains, and its streams part further."""
    diversity = {}
    for init in ("mhc", "spread"):
        run = tmp_path / init
        train.main(TINY + data_flags(prepared) + [f"--out_dir={run}", "--max_iters=8", "--eval_interval=8",
                                                  "--hc_mult=4", f"--hc_init={init}"])
        log = read_log(run)
        assert [abs(r["hc_amax_gain"]["max"] - 1) < 0.01 for r in log] == [True, True]  # at init and after 8 steps
        assert set(log[0]["hc_stream_diversity"]) == {"0", "1"}
        assert all(0 < v < 0.05 for v in log[0]["hc_stream_diversity"].values())
        diversity[init] = log[1]["hc_stream_diversity"]
    assert all(0 < v < 0.5 for v in diversity["mhc"].values())
    assert all(diversity["spread"][b] > 2 * diversity["mhc"][b] for b in diversity["mhc"]), diversity
    out = tmp_path / "spread"
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    model = GPT(train.GPTConfig.from_dict(ckpt["config"]["model"]))
    model.load_state_dict(ckpt["model"])
    streams = {}
    model.blocks[-1].register_forward_hook(lambda m, args, out: streams.update(last=out.detach()))
    with torch.no_grad():
        model(torch.randint(0, model.cfg.vocab_size, (2, 16)))
    x = streams["last"]  # (B, T, 4, C) the last block's streams
    spread = (x - x.mean(dim=2, keepdim=True)).norm(dim=-1) / x.norm(dim=-1).mean(dim=2, keepdim=True)
    assert spread.mean() > 1e-3, spread.mean()  # copies of one embedding at the start, no longer


# ----------------------------------------------------------------------------- decoding, resume, kernels, sampling

def test_mhc_cached_decoding_equals_the_full_forward_with_four_streams():
    model = make_model(hc_config(n=4))
    perturb_maps(model, std=0.3)
    idx = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        cache = Cache(model.cfg.n_layer)
        steps = [model(idx[:, :5], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
    with_cache = torch.cat(list(model.generate(idx[:, :4], 12, temperature=0, use_cache=True)), dim=1)
    without = torch.cat(list(model.generate(idx[:, :4], 12, temperature=0, use_cache=False)), dim=1)
    assert torch.equal(with_cache, without)


def test_mhc_resume_is_exact_with_four_streams(prepared, tmp_path):
    common = TINY + data_flags(prepared) + ["--hc_mult=4", "--lr_decay_iters=12", "--eval_interval=4"]
    a, b = whole_and_resumed(common, tmp_path, 12, 8)
    assert [(r["iter"], r["val_loss"], r["train_loss_mean"], r.get("hc_amax_gain")) for r in a] == \
           [(r["iter"], r["val_loss"], r["train_loss_mean"], r.get("hc_amax_gain")) for r in b]


@pytest.mark.skipif(not (torch.cuda.is_available() or kernels.INTERPRET), reason="needs a GPU or the interpreter")
def test_mhc_triton_kernels_see_the_same_shapes_with_two_streams(monkeypatch):
    monkeypatch.setattr(kernels, "mode", "torch")
    ref = make_model(hc_config(n=2))
    perturb_maps(ref, std=0.3)
    idx, targets = torch.randint(0, VOCAB, (2, 2, 11))
    _, loss_ref = ref(idx, targets)
    kernels.mode = "triton"
    _, loss_tri = ref(idx, targets)
    torch.testing.assert_close(loss_tri, loss_ref, atol=1e-5, rtol=1e-5)


def test_mhc_show_gates_labels_every_stream(prepared, tmp_path):
    out = tmp_path / "run"
    train.main(TINY + data_flags(prepared) + [f"--out_dir={out}", "--max_iters=2", "--eval_interval=2",
                                              "--hc_mult=4"])
    png = tmp_path / "gates.png"
    proc = run("sample.py", f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=8", "--show_gates",
               f"--gates_png={png}", "--device=cpu")
    assert proc.returncode == 0, proc.stderr
    assert "Engram gate, block 1, mean of 4 streams" in proc.stdout and png.stat().st_size > 1000


def test_mhc_stream_diversity_is_zero_for_copies_and_the_relative_spread_otherwise():
    from mhc import expand_streams, stream_diversity
    x = torch.randn(2, 3, 8)
    assert stream_diversity(expand_streams(x, 4)) == 0.0
    mean = torch.ones(8)
    streams = torch.stack([mean + d for d in (torch.full((8,), 0.5), torch.full((8,), -0.5))])  # |d| = sqrt(2)
    assert stream_diversity(streams[None, None]) == pytest.approx(0.5)  # |x_m - mean| / |mean| = 0.5 each
    model = GPT(tiny_config(mhc=MHCConfig(hc_mult=4)))
    model(torch.randint(0, VOCAB, (2, 16)))
    diversity = model.hc_stream_diversity()
    assert set(diversity) == {str(i) for i in range(model.cfg.n_layer)} and all(v >= 0 for v in diversity.values())


# ----------------------------------------------------------------------------- the init and the learning rate (issue 22)

def copies_through_one_block(init, zero_phi=True):
    """stream_diversity of block 0's output, its input being 4 copies of one stream; phi zeroed (the maps are
    their static part alone) so that only the init can make the streams differ."""
    from mhc import expand_streams, stream_diversity
    torch.manual_seed(0)
    model = GPT(hc_config(hc_init=init))
    if zero_phi:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, HyperConnection):
                    m.phi.weight.zero_()
    x = expand_streams(torch.randn(2, 8, model.cfg.n_embd), 4)
    return stream_diversity(model.blocks[0](x)), model


def test_hc_init_spread_breaks_the_streams_symmetry_and_mhc_does_not():
    same, _ = copies_through_one_block("mhc")
    spread, model = copies_through_one_block("spread")
    # equal writes keep copies equal (to rounding); unequal ones split them at once, by (g_m - 1) times the
    # sublayers' output, which is small at init (their weights are N(0, 0.02)) and grows as they train
    assert same < 1e-6 and spread > 1e-4 and spread > 1000 * same
    hc = model.blocks[0].attn_hc
    h_pre, h_post, h_res = hc.maps(torch.randn(1, 3, 4, model.cfg.n_embd))
    torch.testing.assert_close(h_post[0, 0], torch.tensor([0.5, 5 / 6, 7 / 6, 1.5]))  # mean 1: the plain write
    torch.testing.assert_close(h_res.sum(-1), torch.ones(1, 3, 4))  # H_res as mhc's: still doubly stochastic


def test_hc_init_v4_is_deepseek_v4s():
    """DeepSeek-V4's init (transformers' DeepseekV4PreTrainedModel._init_weights): scale 1, base 0, so with
    phi at 0 H_pre = 1/2 (+ eps), H_post = 1 and H_res = 1/n; its HyperHead's collapse weights 1/2."""
    _, model = copies_through_one_block("v4")
    hc = model.blocks[0].attn_hc
    assert torch.equal(hc.scale.data, torch.ones(3)) and torch.equal(hc.bias.data, torch.zeros(24))
    h_pre, h_post, h_res = hc.maps(torch.randn(1, 2, 4, model.cfg.n_embd))
    torch.testing.assert_close(h_pre, torch.full((1, 2, 4), 0.5))
    torch.testing.assert_close(h_post, torch.ones(1, 2, 4))
    torch.testing.assert_close(h_res, torch.full((1, 2, 4, 4), 0.25))
    collapse = StreamCollapse(4, 16, MHCConfig(hc_mult=4, hc_init="v4", hc_collapse="dynamic"))
    assert float(collapse.scale) == 1.0 and torch.equal(collapse.bias.data, torch.zeros(4))
    with pytest.raises(ValueError, match="--hc_init=v4: needs --hc_sinkhorn_iters >= 1"):
        MHCConfig(hc_mult=4, hc_init="v4", hc_sinkhorn_iters=0)
    with pytest.raises(ValueError, match="--hc_init=random: expected one of mhc, v4, spread"):
        MHCConfig(hc_init="random")


def test_hc_lr_mult_gives_mhcs_parameters_their_own_groups():
    from mhc import hc_param_groups
    torch.manual_seed(0)
    model = GPT(hc_config(hc_lr_mult=0.1, hc_collapse="dynamic"))
    hc_params = {id(p) for m in model.modules() if isinstance(m, (HyperConnection, StreamCollapse))
                 for p in m.parameters()}
    (adamw,) = model.configure_optimizers(1e-3, 0.1, (0.9, 0.95))
    slow = [g for g in adamw.param_groups if g["lr_mult"] == 0.1]
    assert {id(p) for g in slow for p in g["params"]} == hc_params
    assert all(g["weight_decay"] == (0.1 if g["params"][0].dim() >= 2 else 0.0) for g in slow)  # a, b: no decay
    assert all(g["lr"] == pytest.approx(1e-4) for g in slow)
    one = GPT(hc_config(hc_lr_mult=1.0))  # at 1: no groups of their own, the optimizer as before the option
    assert all(hc_param_groups(m) == [] for m in one.modules() if isinstance(m, (HyperConnection, StreamCollapse)))
    groups = one.configure_optimizers(1e-3, 0.1, (0.9, 0.95))[0].param_groups  # Engram's table, decay, no decay
    assert sorted(g["lr_mult"] for g in groups) == [1.0, 1.0, 5.0]
    # 0 freezes the maps: one step moves the rest of the model, not them
    frozen = GPT(hc_config(hc_lr_mult=0.0))
    before = {n: p.detach().clone() for n, p in frozen.named_parameters()}
    (opt,) = frozen.configure_optimizers(1e-2, 0.0, (0.9, 0.95))
    for g in opt.param_groups:
        g["lr"] = 1e-2 * g["lr_mult"]
    frozen(torch.randint(0, VOCAB, (2, 16)), torch.randint(0, VOCAB, (2, 16)))[1].backward()
    opt.step()
    moved = {n for n, p in frozen.named_parameters() if not torch.equal(p, before[n])}
    assert moved and not any("_hc." in n or n.startswith("collapse") for n in moved), moved
