"""Bits per byte (train.evaluate's second number, val_bpb in log.jsonl): the cross-entropy summed in bits
over the scored targets, divided by their UTF-8 bytes, with <|endoftext|> and <unk> left out of both."""
import math
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from data import batch_at
from test_model import VOCAB, make_model, tiny_config
from test_train import TINY, data_flags, read_log


def test_bpb_is_the_summed_bits_over_the_targets_bytes():
    model = make_model(tiny_config(engram_sparse=True))
    tokens = np.random.default_rng(0).integers(0, VOCAB, 400).astype(np.uint16)
    cfg = SimpleNamespace(batch_size=3, device="cpu", model=SimpleNamespace(block_size=32))
    starts = np.array([0, 40, 80, 120, 160, 200])
    lengths = torch.randint(1, 6, (VOCAB,))
    lengths[[3, 7]] = 0  # as <|endoftext|> and <unk>
    loss, bpb = train.evaluate(model, tokens, starts, cfg, nullcontext(), byte_lengths=lengths)
    bits = n_bytes = 0.0
    with torch.no_grad():
        for i in range(0, len(starts), 3):
            x, y = batch_at(tokens, starts[i:i + 3], 32, "cpu")
            logits, _ = model(x)
            for t, nats in zip(y.flatten().tolist(), F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")):
                if lengths[t] > 0:
                    bits += float(nats) / math.log(2)
                    n_bytes += int(lengths[t])
    assert bpb == pytest.approx(bits / n_bytes, rel=1e-6)  # float32 sums, in another order
    assert loss == train.evaluate(model, tokens, starts, cfg, nullcontext())[0]  # the loss is as before


def test_bpb_is_logged_and_falls_with_the_loss(prepared, tmp_path, capsys):
    train.main(TINY + data_flags(prepared) + ["--max_iters=20", "--eval_interval=10", f"--out_dir={tmp_path}"])
    log = read_log(tmp_path)
    assert all(r["val_bpb"] > 0 for r in log) and log[-1]["val_bpb"] < log[0]["val_bpb"]
    # about the loss in bits spread over ~4 bytes a token: the same order, not the same number
    assert 0.1 < log[-1]["val_bpb"] / (log[-1]["val_loss"] / math.log(2)) < 0.5
    assert f"({log[-1]['val_bpb']:.4f} bits per byte)" in capsys.readouterr().out
