"""Engram tables sharded across torchrun's ranks (train.py --engram_shard=true, memory.py): the same
losses as replicated DDP over the same global batch, 1/world of the table and its Adam state on each
rank, whole tables in every checkpoint (so a run resumes on another number of ranks and sample.py reads
it), and clipping, fp16 loss scaling, the NaN guard and SIGTERM saving as without shards."""
import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import cli
import memory
import train
from engram import EngramConfig, head_table_sizes
from scripts import ROOT, rank_errors, run, torchrun
from test_train import TINY, data_flags, read_log

HALF = [a for a in TINY if not a.startswith("--batch_size")]  # each run says its own batch size


def test_requests_by_owner_groups_each_row_once_by_its_owner():
    rows = torch.tensor([7, 2, 7, 4, 9, 2, 0])
    unique, inverse, order, counts = memory.requests_by_owner(rows, world=3)
    assert torch.equal(unique[inverse], rows)  # every request is answered from the unique rows
    assert unique.tolist() == [0, 2, 4, 7, 9]  # a row asked for twice is fetched once
    assert unique[order].tolist() == [0, 9, 4, 7, 2]  # grouped by owner (r % 3), rank 0's rows first
    assert counts.tolist() == [2, 2, 1]


def test_shard_rows_is_interleaved_and_the_shards_rebuild_the_table():
    full = torch.arange(11 * 2).view(11, 2)
    shards = [memory.shard_rows(full, k, 3) for k in range(3)]
    assert [s.shape[0] for s in shards] == [4, 4, 3]  # row r on rank r % 3, at r // 3
    assert torch.equal(shards[2][1], full[5])
    padded = torch.stack([torch.cat([s, s.new_zeros(4 - s.shape[0], 2)]) for s in shards])
    assert torch.equal(padded.transpose(0, 1).flatten(0, 1)[:11], full)  # what memory.unshard assembles


def test_sharded_training_matches_replicated_with_one_world_th_of_the_table_per_rank(prepared, tmp_path):
    """30 steps, 2 gloo ranks of batch 8, with clipping active (--grad_clip=0.1): sharded against
    replicated DDP; the log records each rank's table and optimizer bytes. The two sum the same numbers in
    another order (a row's gradients from two ranks, the norm over shards), so they part by rounding, which
    training amplifies as it does any rounding: on ../shared/tinystories 1.3e-5 apart at step 10, 8.5e-5 at
    step 20 and 6.3e-5 at step 30, where replicated DDP and one process of batch 16 (the same sums in yet
    another order) were 2.2e-4 apart at step 20."""
    args = HALF + data_flags(prepared) + ["--max_iters=30", "--eval_interval=10", "--batch_size=8",
                                          "--grad_clip=0.1"]
    for name, extra in (("rep", []), ("shard", ["--engram_shard=true"])):
        proc = torchrun("train.py", *args, f"--out_dir={tmp_path / name}", *extra)
        assert proc.returncode == 0, rank_errors(proc.stderr)
    assert "parameters identical on all 2 ranks" in proc.stdout  # the dense parameters still agree
    rep, shard = read_log(tmp_path / "rep"), read_log(tmp_path / "shard")
    assert [r["iter"] for r in shard] == [0, 10, 20, 30]
    for a, b in zip(rep, shard):
        tolerance = 1e-4 if a["iter"] <= 10 else 2e-3
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=tolerance), (a["iter"], a["val_loss"], b["val_loss"])
    # the tiny model's one Engram layer: 2 orders x 4 heads of distinct primes >= 101, rows of 16 / 4 numbers
    engram = EngramConfig(engram_rows_per_head=101, engram_dim_per_order=16)
    n_rows, dim = sum(head_table_sizes(engram)[0]), engram.engram_dim_per_order // engram.engram_heads_per_order
    whole = {"table": n_rows * dim * 4, "optimizer": 2 * n_rows * dim * 4}  # fp32 rows; Adam's two moments
    assert rep[-1]["engram_bytes_per_rank"] == [whole, whole]
    for k, got in enumerate(shard[-1]["engram_bytes_per_rank"]):
        rows = len(range(k, n_rows, 2))  # ceil or floor of n_rows / 2
        assert got == {"table": rows * dim * 4, "optimizer": 2 * rows * dim * 4}
    ckpt = torch.load(tmp_path / "shard" / "ckpt.pt", weights_only=False)  # whole tables in the checkpoint
    assert ckpt["model"]["blocks.1.engram.table.weight"].shape == (n_rows, dim)
    sparse_state = ckpt["optimizers"][1]["state"][0]
    assert sparse_state["exp_avg"].shape == sparse_state["exp_avg_sq"].shape == (n_rows, dim)


def test_a_sharded_run_resumes_on_one_process_and_a_one_process_run_resumes_sharded(prepared, tmp_path):
    """The same 20 steps three ways: sharded throughout; sharded to 10, then one process (batch 16);
    one process to 10, then sharded. sample.py reads the sharded run's checkpoint on one process."""
    common = HALF + data_flags(prepared) + ["--eval_interval=5", "--lr_decay_iters=20"]
    proc = torchrun("train.py", *common, "--max_iters=20", "--batch_size=8", "--engram_shard=true",
                    f"--out_dir={tmp_path / 'whole'}")
    assert proc.returncode == 0, rank_errors(proc.stderr)
    proc = torchrun("train.py", *common, "--max_iters=10", "--batch_size=8", "--engram_shard=true",
                    f"--out_dir={tmp_path / 'to_one'}")
    assert proc.returncode == 0, rank_errors(proc.stderr)
    train.main([f"--out_dir={tmp_path / 'to_one'}", "--resume", "--max_iters=20", "--batch_size=16",
                "--engram_shard=false"])
    train.main(common + ["--max_iters=10", "--batch_size=16", f"--out_dir={tmp_path / 'to_two'}"])
    proc = torchrun("train.py", f"--out_dir={tmp_path / 'to_two'}", "--resume", "--max_iters=20", "--batch_size=8",
                    "--engram_shard=true")
    assert proc.returncode == 0, rank_errors(proc.stderr)
    whole = read_log(tmp_path / "whole")
    for other in ("to_one", "to_two"):
        log = read_log(tmp_path / other)
        assert [r["iter"] for r in log] == [r["iter"] for r in whole] == [0, 5, 10, 15, 20]
        for a, b in zip(whole, log):
            assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5 if a["iter"] <= 10 else 2e-3), (other, a["iter"])
    sample = run("sample.py", f"--out_dir={tmp_path / 'whole'}", "--num_samples=1", "--max_new_tokens=8",
                 "--device=cpu")
    assert sample.returncode == 0 and "--- sample 1/1" in sample.stdout, sample.stderr[-1000:]


def test_sharded_fp16_matches_replicated_and_a_non_finite_loss_stops_every_rank(prepared, tmp_path):
    args = HALF + data_flags(prepared) + ["--max_iters=6", "--eval_interval=3", "--batch_size=8", "--dtype=float16"]
    for name, extra in (("rep", []), ("shard", ["--engram_shard=true"])):
        proc = torchrun("train.py", *args, f"--out_dir={tmp_path / name}", *extra)
        assert proc.returncode == 0, rank_errors(proc.stderr)
    rep, shard = read_log(tmp_path / "rep"), read_log(tmp_path / "shard")
    for a, b in zip(rep, shard):
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-3)
        assert b.get("loss_scale") == a.get("loss_scale")  # the same steps kept, the same scale
    proc = torchrun("train.py", *args, f"--out_dir={tmp_path / 'nan'}", "--engram_shard=true",
                    "--learning_rate=1e30", "--warmup_iters=0", "--grad_clip=0", "--dtype=float32", "--max_iters=20",
                    "--eval_interval=1")
    # every rank stops with the one-line error (torchrun then reports the exit status, with a traceback of its own)
    assert proc.returncode != 0 and "non-finite" in proc.stderr and "]: Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_sigterm_saves_a_sharded_run_and_its_resume_is_exact(prepared, tmp_path):
    """SIGTERM to every rank mid-run: the ranks finish the step, assemble the whole tables, save and stop;
    a sharded resume then gives the uninterrupted sharded run's evaluations to the last digit."""
    common = HALF + data_flags(prepared) + ["--eval_interval=4", "--max_iters=60", "--batch_size=8",
                                            "--engram_shard=true"]
    proc = torchrun("train.py", *common, f"--out_dir={tmp_path / 'a'}")
    assert proc.returncode == 0, rank_errors(proc.stderr)
    out = tmp_path / "b"
    with socket.socket() as s:  # torchrun by hand, in its own session, so that a signal reaches every rank
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    child = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                              f"--master_port={port}", str(ROOT / "train.py"), *common, f"--out_dir={out}"],
                             cwd=ROOT, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "ckpt.pt").exists() and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGTERM)  # every rank (and torchrun) gets it, as from a job scheduler
    try:
        _, err = child.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        pytest.fail("the sharded run did not stop within 120 s of SIGTERM", pytrace=False)
    stopped_at = torch.load(out / "ckpt.pt", weights_only=False)["iter"]
    assert 0 < stopped_at < 60 and read_log(out)[-1]["iter"] == stopped_at, err[-2000:]
    proc = torchrun("train.py", f"--out_dir={out}", "--resume")
    assert proc.returncode == 0, rank_errors(proc.stderr)
    a = {r["iter"]: r["val_loss"] for r in read_log(tmp_path / "a")}
    b = {r["iter"]: r["val_loss"] for r in read_log(out)}
    assert {i: b[i] for i in a} == a


def test_shard_and_offload_flags_are_checked(prepared, tmp_path, capsys):
    # one process: a note, and the one shard is the whole table
    train.main(TINY + data_flags(prepared) + ["--max_iters=2", "--eval_interval=2", "--engram_shard=true",
                                              f"--out_dir={tmp_path / 'one'}"])
    assert "note: --engram_shard=true on one process" in capsys.readouterr().out
    # more ranks than the smallest head has rows
    cfg = SimpleNamespace(engram_shard=True, engram_offload="", model=SimpleNamespace(
        engram=EngramConfig(engram_rows_per_head=2, engram_heads_per_order=1, engram_dim_per_order=4)))
    with pytest.raises(cli.ConfigError, match="smallest head has 2 rows"):
        memory.check_placement(cfg, ddp=True, world=3, master=True)
    assert memory.check_placement(cfg, ddp=True, world=2, master=True) == 2
    for flags, message in ((["--engram=off", "--engram_shard=true"], "has no Engram table"),
                           (["--engram=off", "--engram_offload=host"], "has no Engram table"),
                           (["--engram_shard=true", "--engram_offload=host"], "choose one"),
                           (["--engram_offload=disk"], "expected host"),
                           (["--engram_offload=host", "--engram_sparse=false"], "needs --engram_sparse=true")):
        proc = run("train.py", *TINY, *data_flags(prepared), "--max_iters=2", f"--out_dir={tmp_path / 'bad'}", *flags)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (flags, proc.stderr)
    assert not (tmp_path / "bad" / "ckpt.pt").exists()
