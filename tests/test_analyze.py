"""analyze.py: knockout is the forward without Engram's residual term, LogitLens and CKA have their defining
properties, the token classes and n-gram buckets come from the text alone and partition the scored tokens,
bad runs are one-line errors, and the whole script runs on two tiny trained runs."""
import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch

import analyze
import train
from mhc import MHCConfig, expand_streams
from scripts import run
from test_model import VOCAB, make_model, tiny_config
from test_train import TINY, data_flags


def engram_model(hc_mult=1):
    """The tiny model of test_model.py with Engram in blocks 0 and 2, on hc_mult residual streams."""
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, engram_layers=(0, 2)),
                              mhc=MHCConfig(hc_mult=hc_mult))
    return make_model(cfg)


def forward_without(model, idx, skipped):
    """GPT.forward written out by hand, leaving out the Engram term of the blocks in skipped."""
    x = expand_streams(model.tok_emb(idx), model.cfg.mhc.hc_mult)  # (B, T, n, C)
    context = model.compression(idx)
    for i, block in enumerate(model.blocks):
        if block.engram is not None and i not in skipped:
            x = x + block.engram(x, context)
        h, maps = block.attn_hc.read(x)
        x = block.attn_hc.write(x, block.attn(block.attn_norm(h)[:, :, 0]), maps)
        h, maps = block.ffn_hc.read(x)
        x = block.ffn_hc.write(x, block.ffn(block.ffn_norm(h)[:, :, 0]), maps)
    return model.lm_head(model.norm(model.collapse(x)))


# ----------------------------------------------------------------------------- the model probes

@pytest.mark.parametrize("hc_mult", [1, 2])
@torch.no_grad()
def test_knockout_is_the_forward_without_that_residual_term(hc_mult):
    model = engram_model(hc_mult)
    idx = torch.randint(0, VOCAB, (2, 20))
    full = model(idx)[0]
    torch.testing.assert_close(forward_without(model, idx, ()), full, rtol=0, atol=0)  # the loop is the forward
    engrams = analyze.engram_modules(model)
    plans = analyze.knockouts(engrams)
    assert [i for i, _ in engrams] == [0, 2] and set(plans) == {"all", "0", "2"}
    for name, removed in plans.items():
        skipped = {0, 2} if name == "all" else {int(name)}
        knocked = analyze.logits_with_knockout(model, idx, removed)
        torch.testing.assert_close(knocked, forward_without(model, idx, skipped), rtol=0, atol=0)
        assert not torch.allclose(knocked, full)
    assert not any(e.knockout for _, e in engrams)  # set back afterwards
    torch.testing.assert_close(model(idx)[0], full, rtol=0, atol=0)


@pytest.mark.parametrize("hc_mult", [1, 2])
@torch.no_grad()
def test_logit_lens_of_the_last_block_is_the_final_prediction(hc_mult):
    model = engram_model(hc_mult)
    idx = torch.randint(0, VOCAB, (2, 20))
    with analyze.block_outputs(model) as hidden:
        logits = model(idx)[0]
    assert len(hidden) == model.cfg.n_layer and hidden[0].shape == (2, 20, hc_mult, model.cfg.n_embd)
    kl = analyze.lens_kl(model, hidden, logits, skip=2)
    assert kl[-1] == 0 and (kl[:-1] > 0).all()


def test_cka_is_one_for_itself_and_blind_to_rotation_and_scale():
    gen = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    x = randn(900, 24) @ randn(24, 24)  # correlated features
    y = x[:, :12] @ randn(12, 16) + 3 * randn(900, 16)
    q, _ = torch.linalg.qr(randn(24, 24))  # orthogonal

    def cka(a, b, batch=300):
        c = analyze.MinibatchCKA(1, 1)
        for part in torch.arange(len(a)).tensor_split(len(a) // batch):
            c.update([a[part]], [b[part]])
        return float(c.result()[0, 0])
    assert cka(x, x) == pytest.approx(1, abs=1e-12)
    base = cka(x, y)
    assert 0.05 < base < 0.95
    assert cka(x @ q, y) == pytest.approx(base, abs=1e-9)
    assert cka(3.7 * x, y) == pytest.approx(base, abs=1e-9)
    assert cka(x @ q * 0.01, 50 * y) == pytest.approx(base, abs=1e-9)


def test_alignment_index():
    for k in (1, 2, 4):
        np.testing.assert_allclose(analyze.alignment_index(np.eye(6), k), np.arange(6))
    sim = np.array([[0.2, 0.9, 0.6], [0.1, 0.3, 0.8]])
    np.testing.assert_allclose(analyze.alignment_index(sim, 2), [(0.9 * 1 + 0.6 * 2) / 1.5, (0.8 * 2 + 0.3 * 1) / 1.1])


# ----------------------------------------------------------------------------- classes and buckets from the text

EOT, V = 9, 10
# (1,2)->3, (2,3)->1, (3,1)->2 and (5,6)->7 twice each: stock at min_count=2; (1,2)->4 once; (6,7)->5 and
# (6,7)->9 once each, (7,5)->6 once: no stock continuation
TRAIN = np.array([1, 2, 3, 1, 2, 3, 1, 2, 4, EOT, 5, 6, 7, 5, 6, 7, EOT])
WINDOW = np.array([1, 2, 3, 1, 2, 3, 8, 2, EOT, 8, 1, 2, 4, 8])  # inputs [:-1], targets [1:]
# target t: 0 stock (the pair's train continuation), 1 in-context (earlier in its own story), 2 other
CLASSES = [2, 0, 0, 0, 0, 2, 1, 2, 2, 2, 2, 2, 1]  # t=4: stock and seen, stock first; t=8: 8 only in the story before


def test_stock_table_and_token_classes_from_the_text():
    pairs, nxt, base = analyze.stock_table(TRAIN, V, min_count=2)
    assert dict(zip(pairs.tolist(), nxt.tolist())) == {1 * V + 2: 3, 2 * V + 3: 1, 3 * V + 1: 2, 5 * V + 6: 7}
    stock = (pairs, nxt, base)
    assert analyze.token_classes(WINDOW[None], stock, EOT, skip=0).tolist() == [CLASSES]
    other = np.array([5, 6, 7, 5, 6, 7, 1, 2, 3, 1, 2, 3, 3, 3])
    both = analyze.token_classes(np.stack([WINDOW, other]), stock, EOT, skip=2)
    assert both.tolist() == [CLASSES[2:], [1, 1, 0, 2, 2, 0, 0, 0, 0, 1, 1]]


def test_buckets_and_classes_partition_the_scored_positions():
    np.testing.assert_array_equal(analyze.frequency_buckets(np.array([0, 1, 9, 10, 99, 100, 999, 1000, 10**6])),
                                  [0, 1, 1, 2, 2, 3, 3, 4, 4])
    train_ids = np.array([1, 2, 3] * 40 + [EOT, 5, 6, 7, EOT])
    canonical = np.arange(V)
    canonical[4] = 3  # 4 folds onto 3, as tokenizer compression folds " Cat" onto "cat"
    keys, counts = np.unique(analyze.ngram_keys(canonical[train_ids], 3, V), return_counts=True)
    text = analyze.Text(analyze.stock_table(train_ids, V, 2), keys, counts, canonical, 3, V, EOT)
    window = np.array([[1, 2, 4, 1, 5, 6, 7, 8, 0], [3, 1, 2, 3, 1, 2, 5, 6, 7]])
    cols = analyze.text_columns(window, text, skip=2)
    # the 3-gram ending at each input from position 2, in canonical ids: (1,2,4) is (1,2,3), seen 40 times in
    # train; (2,4,1) is (2,3,1), seen 39 times (as (3,1,2)); (4,1,5), (1,5,6) unseen; (5,6,7) once; (6,7,8) unseen
    assert cols["train_count"].tolist() == [[40, 39, 0, 0, 1, 0], [39, 40, 39, 39, 0, 0]]
    assert cols["bucket"].tolist() == [[2, 2, 0, 0, 1, 0], [2, 2, 2, 2, 0, 0]]
    assert cols["ngram_tokens"][0, 0].tolist() == [1, 2, 4] and cols["class"].shape == (2, 6)
    flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in cols.items()}
    n = len(flat["class"])
    flat.update(loss=np.ones(n), correct=np.ones(n, bool), ko_loss_all=np.ones(n), ko_correct_all=np.ones(n, bool),
                twin_loss=np.ones(n), twin_correct=np.ones(n, bool), gate=np.full(n, 0.5))
    ko = analyze.knockout_results(flat, has_twin=True)
    assert sum(ko[c]["tokens"] for c in analyze.CLASSES) == ko["all"]["tokens"] == n
    assert sum(b["tokens"] for b in analyze.frequency_results(flat, has_twin=True)) == n


# ----------------------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def runs(prepared, tmp_path_factory):
    """Two tiny runs on the same data: with Engram, and its twin trained with --engram=off."""
    root = tmp_path_factory.mktemp("analyze")
    flags = TINY + data_flags(prepared) + ["--max_iters=4", "--eval_interval=4", "--eval_iters=1"]
    train.main(flags + [f"--out_dir={root / 'engram'}"])
    train.main(flags + [f"--out_dir={root / 'twin'}", "--engram=off"])
    return root


def fails(capsys, *argv):
    """analyze.main's one-line error: exit status 2, `error: ...` alone on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        analyze.main(list(argv) + ["--device=cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_runs_are_one_line_errors(runs, prepared, tmp_path, capsys):
    assert "has no Engram layer" in fails(capsys, f"--runs={runs / 'twin'},{runs / 'engram'}")
    assert "the twin trained with --engram=off" in fails(capsys, f"--runs={runs / 'engram'},{runs / 'engram'}")
    assert "no checkpoint at" in fails(capsys, f"--runs={runs / 'engram'},{tmp_path / 'nothing'}")
    other = tmp_path / "other-vocab"
    shutil.copytree(runs / "twin", other)
    ckpt = torch.load(other / "ckpt.pt", weights_only=False)
    ckpt["meta"]["gpt2_ids"], ckpt["meta"]["vocab_size"] = ckpt["meta"]["gpt2_ids"][:-1], ckpt["meta"]["vocab_size"] - 1
    torch.save(ckpt, other / "ckpt.pt")
    assert "another tokenizer or vocabulary" in fails(capsys, f"--runs={runs / 'engram'},{other}")
    assert "is not there" in fails(capsys, f"--runs={runs / 'engram'}", f"--data_dir={tmp_path / 'no-data'}")
    moved = tmp_path / "other-data"
    shutil.copytree(prepared["data_dir"], moved)
    meta = json.loads((moved / "meta.json").read_text())
    (moved / "meta.json").write_text(json.dumps({**meta, "train_tokens": meta["train_tokens"] + 1}))
    assert "train_tokens differ" in fails(capsys, f"--runs={runs / 'engram'}", f"--data_dir={moved}")
    assert "--runs is missing" in fails(capsys)
    proc = run("analyze.py", f"--runs={runs / 'twin'}", "--device=cpu")  # as a process: no traceback either
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def finite_numbers(x):
    if isinstance(x, dict):
        return all(finite_numbers(v) for v in x.values())
    if isinstance(x, list):
        return all(finite_numbers(v) for v in x)
    return not isinstance(x, float) or math.isfinite(x)


def test_end_to_end_on_two_tiny_runs(runs, tmp_path, capsys):
    out = tmp_path / "report"
    r = analyze.main([f"--runs={runs / 'engram'},{runs / 'twin'}", f"--out_dir={out}", "--windows=12",
                      "--batch_size=5", "--device=cpu", "--cka_batch=64", "--gate_min_count=2"])
    assert "wrote" in capsys.readouterr().out
    for name in ("analysis.md", "analysis.json", "analysis_logit_lens.png", "analysis_cka.png"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "analysis.json").read_text())
    assert saved == json.loads(json.dumps(r)) and finite_numbers(saved)
    assert saved["tokens"] == 12 * (32 - 2) and saved["windows"] == 12
    ko = saved["knockout"]
    assert sum(ko[c]["tokens"] for c in analyze.CLASSES) == ko["all"]["tokens"] == saved["tokens"]
    assert all(ko["all"][k] is not None for k in ("twin_loss", "engram_loss", "knockout_loss", "acc_retained"))
    lens = saved["logit_lens"]
    assert len(lens["kl_engram"]) == len(lens["kl_twin"]) == 2 and lens["kl_engram"][-1] == 0 == lens["kl_twin"][-1]
    assert np.array(saved["cka"]["similarity"]).shape == (2, 2) and saved["cka"]["top_k"] == 1
    assert sum(b["tokens"] for b in saved["frequency"]) == saved["tokens"]
    assert saved["gates"]["highest"] and all(0 < h["hottest_share"]["50%"] <= 1 for h in saved["access"]["1"])
    md = (out / "analysis.md").read_text()
    assert f"Scored {saved['tokens']:,} tokens" in md and "TriviaQA 29%" in md and "C3 93%" in md
