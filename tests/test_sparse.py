"""Sparse Engram tables (engram_sparse): a step reads and writes only the rows its batch looked up.

Against the dense path (AdamW over the whole table): the same loss and the same update of every
touched row; untouched rows stay exactly as they were (lazy Adam); no table-sized tensor is made
per step; and the sparse optimizer's state resumes exactly, alone and under 2-process DDP."""
import dataclasses
import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import train
from model import GPT
from scripts import rank_errors, torchrun
from test_model import VOCAB, tiny_config


def twin(sparse_rows=101):
    """The same weights twice: dense table training, and sparse."""
    models = {}
    for sparse in (False, True):
        cfg = tiny_config(engram_sparse=sparse)
        cfg = dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, engram_rows_per_head=sparse_rows))
        torch.manual_seed(0)
        models["sparse" if sparse else "dense"] = GPT(cfg).train()
    models["sparse"].load_state_dict(models["dense"].state_dict())
    return models


def step(model, optimizers, batch):
    """One training step as train.py takes it: forward, backward, clipping, the optimizers."""
    _, loss = model(batch[:, :-1], batch[:, 1:])
    loss.backward()
    train.clip_grad_norm(model.parameters(), 1.0)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.item()


def table(model):
    return model.blocks[1].engram.table.weight.detach().clone()


def touched_rows(model, batch):
    """The table rows this batch looks up (every head of every position), from a sparse backward
    whose gradients are then dropped: the model is left as it was."""
    _, loss = model(batch[:, :-1], batch[:, 1:])
    loss.backward()
    rows = model.blocks[1].engram.table.weight.grad.coalesce().indices()[0]
    model.zero_grad(set_to_none=True)
    return rows


def test_sparse_and_dense_paths_take_the_same_step_on_touched_rows():
    models = twin()
    optimizers = {k: m.configure_optimizers(1e-2, 0.1, (0.9, 0.95)) for k, m in models.items()}
    # The one difference in the update rule itself: SparseAdam adds eps before the bias correction
    # (AdamW's eps / sqrt(1 - beta2^t)), which moves rows whose gradient is near eps (~1e-8). With eps
    # negligible in both, a touched row must get the same update from both.
    for group in (g for opts in optimizers.values() for opt in opts for g in opt.param_groups):
        group["eps"] = 1e-30
    assert [type(o).__name__ for o in optimizers["dense"]] == ["AdamW"]
    assert [type(o).__name__ for o in optimizers["sparse"]] == ["AdamW", "SparseAdam"]
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB, (2, 17), generator=gen) for _ in range(2)]
    before = table(models["dense"])

    first = touched_rows(models["sparse"], batches[0])  # before any step
    untouched = torch.ones(before.shape[0], dtype=torch.bool)
    untouched[first] = False
    assert 0 < len(first) < 0.5 * before.shape[0]

    losses = {k: step(m, optimizers[k], batches[0]) for k, m in models.items()}
    assert losses["sparse"] == losses["dense"]  # the same forward, bit for bit
    after = {k: table(m) for k, m in models.items()}
    torch.testing.assert_close(after["sparse"][first], after["dense"][first], rtol=1e-4, atol=1e-7)
    assert not torch.equal(after["sparse"][first], before[first])
    assert torch.equal(after["sparse"][untouched], before[untouched])  # exactly as they were
    dense_params = dict(models["dense"].named_parameters())
    for name, p in models["sparse"].named_parameters():  # and the rest of the model moved alike
        torch.testing.assert_close(p, dense_params[name], rtol=1e-4, atol=1e-6, msg=name)

    # Step 2: rows that step 1 touched and step 2 does not. Dense Adam still moves them with the
    # momentum of step 1; lazy Adam leaves them alone. This is the whole difference between the two.
    second = touched_rows(models["sparse"], batches[1])
    only_first = torch.zeros(before.shape[0], dtype=torch.bool)
    only_first[first] = True
    only_first[second] = False
    assert only_first.any()
    for k, m in models.items():
        step(m, optimizers[k], batches[1])
    final = {k: table(m) for k, m in models.items()}
    assert torch.equal(final["sparse"][only_first], after["sparse"][only_first])
    assert not torch.allclose(final["dense"][only_first], after["dense"][only_first])


def test_sparse_step_makes_no_table_sized_tensor():
    """After the first step (which creates Adam's two moments, the only table-sized state), a
    sparse step allocates nothing near the table's size; the dense path allocates its gradient."""
    models = twin(sparse_rows=20_000)  # a 1.3 MB table, far larger than anything else in this model
    table_bytes = models["dense"].blocks[1].engram.table.weight.numel() * 4
    batch = torch.randint(0, VOCAB, (2, 17))
    largest = {}
    for name, model in models.items():
        optimizers = model.configure_optimizers(1e-3, 0.1, (0.9, 0.95))
        step(model, optimizers, batch)  # creates the optimizer state
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step(model, optimizers, batch)
        largest[name] = max(e.cpu_memory_usage for e in prof.events())
    assert largest["dense"] >= table_bytes
    assert largest["sparse"] < table_bytes / 8


def test_sparse_gradient_holds_only_looked_up_rows():
    model = twin()["sparse"]
    batch = torch.randint(0, VOCAB, (2, 17))
    _, loss = model(batch[:, :-1], batch[:, 1:])
    loss.backward()
    grad = model.blocks[1].engram.table.weight.grad
    assert grad.is_sparse
    n_heads = 2 * model.cfg.engram.engram_heads_per_order
    assert grad._nnz() == 2 * 16 * n_heads  # one (row, value) pair per position and head, before coalescing


@pytest.mark.parametrize("sparse", ["true", "false"])
def test_resume_is_exact_with_sparse_and_dense_tables(prepared, tmp_path, sparse):
    from test_train import TINY, assert_same_curve, data_flags, read_log
    common = TINY + data_flags(prepared) + ["--eval_interval=4", "--lr_decay_iters=12", f"--engram_sparse={sparse}"]
    train.main(common + [f"--out_dir={tmp_path / 'a'}", "--max_iters=12"])
    train.main(common + [f"--out_dir={tmp_path / 'b'}", "--max_iters=4"])
    state = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert len(state["optimizers"]) == (2 if sparse == "true" else 1)  # SparseAdam's moments are saved too
    train.main([f"--out_dir={tmp_path / 'b'}", "--max_iters=12", "--resume"])
    assert_same_curve(read_log(tmp_path / "a"), read_log(tmp_path / "b"))


def test_ddp_sparse_two_processes_match_one_process_over_the_same_global_batch(prepared, tmp_path):
    """gloo, 2 ranks of batch 8 against 1 process of batch 16: every rank takes its half of the same
    global batch, DDP averages the dense gradients and memory.average_sparse_grads the sparse ones."""
    from test_train import TINY, data_flags, read_log
    args = [a for a in TINY if not a.startswith("--batch_size")] + data_flags(prepared) + [
        "--max_iters=6", "--eval_interval=2", "--engram_sparse=true"]
    train.main(args + [f"--out_dir={tmp_path / 'one'}", "--batch_size=16"])
    proc = torchrun("train.py", *args, f"--out_dir={tmp_path / 'two'}", "--batch_size=8")
    assert proc.returncode == 0, rank_errors(proc.stderr)
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    for a, b in zip(one, two):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=2e-5), (a["iter"], a["val_loss"], b["val_loss"])
    assert json.loads((tmp_path / "two" / "config.json").read_text())["model"]["engram"]["engram_sparse"]
