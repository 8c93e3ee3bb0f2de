"""train.py and sample.py end to end on a tiny model: the loss drops, resume is exact,
DDP ranks agree, sampling works, and bad input gives one-line errors."""
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cli
import data
import train
from engram import EngramConfig
from scripts import rank_errors, run, skip_if_exercise, torchrun

ROOT = Path(__file__).resolve().parents[1]

# A tiny MLA + MoE + Engram model: every part of the default architecture, in seconds.
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--eval_iters=2",
        "--kv_lora_rank=16", "--qk_nope_head_dim=8", "--qk_rope_head_dim=8", "--v_head_dim=8",
        "--n_routed_experts=4", "--moe_inter_dim=16", "--engram_rows_per_head=101", "--engram_dim_per_order=16",
        "--warmup_iters=5", "--learning_rate=1e-2", "--device=cpu", "--preset=cpu"]


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def data_flags(prepared):
    return [f"--data_dir={prepared['data_dir']}", f"--source={prepared['source']}"]


def test_training_lowers_the_loss(prepared, tmp_path):
    out = tmp_path / "out"
    train.main(TINY + data_flags(prepared) + [f"--out_dir={out}", "--max_iters=30", "--eval_interval=10"])
    log = read_log(out)
    assert [r["iter"] for r in log] == [0, 10, 20, 30]
    for key in ("iter", "tokens", "train_loss_mean", "train_loss_last", "val_loss", "lr", "tok_per_s", "elapsed_s"):
        assert key in log[-1]
    assert log[-1]["val_loss"] < log[0]["val_loss"] - 0.5
    assert "moe_max_over_mean" in log[-1]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["max_iters"] == 30 and cfg["model"]["n_embd"] == 32


def assert_same_curve(a, b, train_loss=True):
    assert [r["iter"] for r in a] == [r["iter"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["val_loss"] == pytest.approx(rb["val_loss"], abs=1e-6)
        if train_loss and ra["train_loss_mean"] is not None:
            assert ra["train_loss_mean"] == pytest.approx(rb["train_loss_mean"], abs=1e-6)
            assert ra["train_loss_last"] == pytest.approx(rb["train_loss_last"], abs=1e-6)


def whole_and_resumed(flags, tmp_path, total, cut):
    """The logs of a run trained to `total` steps at once (tmp_path/a) and of one stopped at `cut` and
    resumed to `total` (tmp_path/b). The resumed run takes its settings from its config.json; only
    max_iters changes."""
    train.main(flags + [f"--out_dir={tmp_path / 'a'}", f"--max_iters={total}"])
    train.main(flags + [f"--out_dir={tmp_path / 'b'}", f"--max_iters={cut}"])
    train.main([f"--out_dir={tmp_path / 'b'}", f"--max_iters={total}", "--resume"])
    return read_log(tmp_path / "a"), read_log(tmp_path / "b")


def test_resume_equals_uninterrupted(prepared, tmp_path):
    common = TINY + data_flags(prepared) + ["--eval_interval=5", "--lr_decay_iters=20"]
    assert_same_curve(*whole_and_resumed(common, tmp_path, 20, 10))
    with pytest.raises(SystemExit):  # the model is the checkpoint's: changing it is refused
        train.main([f"--out_dir={tmp_path / 'b'}", "--n_embd=64", "--resume"])


def test_ctrl_c_saves_a_step_boundary_and_resume_is_exact(prepared, tmp_path):
    """SIGINT mid-run: the run finishes its step, saves, exits 130; --resume then reproduces
    the uninterrupted run's evaluations exactly."""
    common = TINY + data_flags(prepared) + ["--eval_interval=3", "--max_iters=60", "--seed=7"]
    train.main(common + [f"--out_dir={tmp_path / 'a'}"])
    out = tmp_path / "b"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *common, f"--out_dir={out}"], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "ckpt.pt").exists() and time.time() < deadline and child.poll() is None:  # let it get going
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    skip_if_exercise(err)
    assert child.returncode == 130, err[-2000:]
    stopped_at = torch.load(out / "ckpt.pt", weights_only=False)["iter"]
    assert 0 < stopped_at < 60
    assert read_log(out)[-1]["iter"] == stopped_at  # the interrupted step was evaluated and logged
    train.main([f"--out_dir={out}", "--resume"])
    a = [r for r in read_log(tmp_path / "a")]
    b = [r for r in read_log(out) if r["iter"] != stopped_at or stopped_at % 3 == 0]  # drop the extra point
    # train_loss averages the steps since the last evaluation, so the window cut by the stop
    # differs; the validation losses (the model's state) must not
    assert_same_curve(a, b, train_loss=False)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(prepared, tmp_path):
    out = tmp_path / "nan"
    proc = run("train.py", *TINY, *data_flags(prepared), f"--out_dir={out}", "--max_iters=20", "--eval_interval=1",
               "--learning_rate=1e30", "--warmup_iters=0", "--grad_clip=0")
    assert proc.returncode == 1 and "non-finite" in proc.stderr and "Traceback" not in proc.stderr
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["iter"] < 20
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_ddp_two_processes_agree(prepared, tmp_path):
    out = tmp_path / "ddp"
    args = TINY + data_flags(prepared) + [f"--out_dir={out}", "--max_iters=4", "--eval_interval=2"]
    proc = torchrun("train.py", *args)
    assert proc.returncode == 0, rank_errors(proc.stderr)
    assert "parameters identical on all 2 ranks" in proc.stdout
    log = read_log(out)
    assert log[-1]["iter"] == 4
    # Two ranks of batch 8 count 16 sequences per step.
    assert log[-1]["tokens"] == 4 * 2 * 8 * 32


def test_sample_streams_a_story(prepared, tmp_path):
    out = tmp_path / "out"
    train.main(TINY + data_flags(prepared) + [f"--out_dir={out}", "--max_iters=5", "--eval_interval=5"])
    proc = run("sample.py", f"--out_dir={out}", "--start=Once upon a time", "--num_samples=2",
               "--max_new_tokens=12", "--stop_at_eot=false")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Once upon a time") == 2
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("The cat sat")
    proc = run("sample.py", f"--out_dir={out}", f"--start=FILE:{prompt_file}", "--num_samples=1", "--max_new_tokens=5")
    assert proc.returncode == 0 and "The cat sat" in proc.stdout
    png = tmp_path / "gates.png"
    proc = run("sample.py", f"--out_dir={out}", "--num_samples=0", "--start=Once upon a time there was a cat",
               "--show_gates", f"--gates_png={png}")
    assert proc.returncode == 0, proc.stderr
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Engram gate, block 1" in proc.stdout and " upon" in proc.stdout


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    for frag in fragments:
        assert frag in lines[0]


def test_cli_errors(prepared, tmp_path):
    assert_one_line_error(run("train.py", "--max_iter=5"), "unknown flag --max_iter", "--max_iters")
    assert_one_line_error(run("train.py", "--batch_size=lots"), "--batch_size=lots", "int")
    assert_one_line_error(run("train.py", "--attn=gqa"), "attn")
    assert_one_line_error(run("train.py", "--kernels=fast"), "kernels")
    assert_one_line_error(run("train.py", f"--data_dir={tmp_path / 'nodata'}", "--source=/no/such/place",
                              f"--out_dir={tmp_path / 'out'}"),
                          "/no/such/place")
    assert_one_line_error(run("sample.py", f"--out_dir={tmp_path / 'nothing'}"), "no checkpoint")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ckpt.pt").write_bytes(b"not a checkpoint")
    assert_one_line_error(run("sample.py", f"--out_dir={bad}"), "unreadable")
    assert_one_line_error(run("train.py", f"--out_dir={bad / 'x'}", "--resume"), "no checkpoint")


def test_flag_names_are_unique_across_configs():
    """The command line is flat (--kv_lora_rank=64), so no two config fields may share a name."""
    names = []

    def collect(cfg):
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            collect(value) if dataclasses.is_dataclass(value) else names.append(f.name)
    collect(train.TrainConfig())
    assert len(names) == len(set(names))
    assert set(names) == set(cli.flat_fields(train.TrainConfig()))


def test_presets_and_overrides():
    cfg = train.config(["--device=cpu", "--n_embd=64", "--engram=off"])
    assert cfg.preset == "cpu" and cfg.model.n_embd == 64 and cfg.model.engram.engram_layers == ()
    assert cfg.max_iters == train.PRESETS["cpu"]["max_iters"]
    cfg = train.config(["--preset=gpu", "--device=cpu", "--engram_layers=1,2"])
    assert cfg.model.n_embd == train.PRESETS["gpu"]["n_embd"] and cfg.model.engram.engram_layers == (1, 2)
    with pytest.raises(cli.ConfigError, match="expected on or off"):
        train.config(["--engram=maybe"])


def test_cpu_preset_sizes_the_engram_table_by_the_train_split(prepared, monkeypatch):
    """The excerpt-sized split gets the small table, a large split 2^16 rows; a given flag, another preset
    and a model without Engram are left alone (and the last two read no data)."""
    rows = lambda argv: train.config(["--device=cpu"] + argv).model.engram.engram_rows_per_head
    assert cli.rows_for_split(cli.SMALL_SPLIT_TOKENS - 1) == cli.SMALL_SPLIT_ROWS
    assert cli.rows_for_split(cli.SMALL_SPLIT_TOKENS) == cli.ROWS
    assert rows(data_flags(prepared)) == cli.SMALL_SPLIT_ROWS  # ~0.1M tokens
    assert rows(data_flags(prepared) + ["--engram_rows_per_head=777"]) == 777
    monkeypatch.setattr(data, "load_or_prepare", lambda data_cfg: {"train_tokens": 2_000_000})
    assert rows(data_flags(prepared)) == cli.ROWS
    monkeypatch.setattr(data, "load_or_prepare", lambda data_cfg: pytest.fail("read the data"))
    assert rows(["--preset=gpu"]) == train.PRESETS["gpu"].get("engram_rows_per_head", EngramConfig().engram_rows_per_head)
    train.config(["--device=cpu", "--engram=off"])


def test_lr_schedule():
    cfg = train.TrainConfig(max_iters=100, warmup_iters=10, learning_rate=1.0, min_lr=0.1)
    lrs = [train.lr_at(i, cfg) for i in range(120)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # warmup rises
    assert lrs[10] == pytest.approx(1.0, abs=1e-2) and lrs[99] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then decays monotonically
    assert math.isclose(lrs[119], 0.1)


def test_clip_grad_norm_coalesces_a_sparse_gradient():
    """A sparse table gradient that names row 2 twice holds one row there, the two summed: the norm is taken
    after coalescing, over the dense and sparse gradients together, and clipping scales both."""
    dense, table, unused = (torch.nn.Parameter(torch.zeros(shape)) for shape in ((2,), (5, 2), (3,)))
    dense.grad = torch.tensor([3.0, 0.0])
    table.grad = torch.sparse_coo_tensor(torch.tensor([[2, 2, 4]]), torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 4.0]]),
                                         (5, 2), check_invariants=True)
    # coalesced, row 2 is (2, 4) and row 4 is (0, 4): the norm is sqrt(9 + 4 + 16 + 16), not sqrt(35)
    assert train.clip_grad_norm([dense, table, unused], 0) == pytest.approx(45 ** 0.5)
    assert dense.grad.tolist() == [3.0, 0.0]  # max_norm=0 only measures
    assert train.clip_grad_norm([dense, table, unused], 1.0) == pytest.approx(45 ** 0.5)
    scale = 1 / 45 ** 0.5
    torch.testing.assert_close(dense.grad, torch.tensor([3.0, 0.0]) * scale)
    torch.testing.assert_close(table.grad.to_dense(), torch.tensor([[0, 0], [0, 0], [2, 4], [0, 0], [0, 4.0]]) * scale)
    assert unused.grad is None


def test_a_hung_multi_process_run_fails_with_each_ranks_stack(tmp_path):
    """CI robustness: a torchrun test that hangs (here rank 1 waits in a barrier that rank 0 never joins)
    fails after its timeout with the stack of every rank, not a bare timeout, and leaves no process behind."""
    script = tmp_path / "hang.py"
    script.write_text("import time\nimport torch.distributed as dist\ndist.init_process_group('gloo')\n"
                      "if dist.get_rank() == 1:\n    dist.barrier()\nelse:\n    time.sleep(600)\n")
    with pytest.raises(pytest.fail.Exception) as failure:
        torchrun(str(script), timeout=40)
    message = str(failure.value)
    assert "hung for 40 s" in message
    rank0, rank1 = message.split("--- rank 0")[1].split("--- rank 1")
    assert "hang.py\", line 7" in rank0  # the sleep
    assert "in barrier" in rank1 and "hang.py\", line 5" in rank1  # waiting in the collective
