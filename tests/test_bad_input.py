"""Bad input and faults, as a user meets them: each ends as a one-line error (non-zero exit, no
traceback) that names the flag, file or value, or as correct behaviour; nothing on disk is lost.
Plus what users expect: --help on every script, the end-of-run summary and loss.png, full-length
samples, SIGTERM saving like Ctrl-C, and the GPU paths (bf16 autocast, torch.compile) run on a CPU."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import mhc
import plots
import train
from scripts import run, skip_if_exercise

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--eval_iters=2",
        "--kv_lora_rank=16", "--qk_nope_head_dim=8", "--qk_rope_head_dim=8", "--v_head_dim=8",
        "--n_routed_experts=4", "--moe_inter_dim=16", "--engram_rows_per_head=101", "--engram_dim_per_order=16",
        "--warmup_iters=2", "--device=cpu", "--preset=cpu"]


def one_line_error(stderr, *fragments):
    """stderr is exactly one line, with no traceback, holding every fragment."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def data_flags(prepared):
    return [f"--data_dir={prepared['data_dir']}", f"--source={prepared['source']}"]


def snapshot(folder):
    """{file name: bytes} of a run folder, to show that nothing in it changed."""
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def copy_run(folder, to):
    """A copy of a run folder to damage or extend, leaving the original as it is."""
    to.mkdir()
    for name, content in snapshot(folder).items():
        (to / name).write_bytes(content)
    return to


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    """A finished tiny run (6 steps) to resume, sample from and damage copies of."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train.main(TINY + data_flags(prepared) + [f"--out_dir={out}", "--max_iters=6", "--eval_interval=3"])
    return out


# ----------------------------------------------------------------------------- values: one line, exit 2

BAD_VALUES = [
    ("train.py", ["--block_size=0"], "--block_size=0"),
    ("train.py", ["--n_head=0"], "--n_head=0"),
    ("train.py", ["--n_embd=-8"], "--n_embd=-8"),
    ("train.py", ["--learning_rate=-0.1"], "--learning_rate=-0.1"),
    ("train.py", ["--beta1=1.0"], "--beta1=1.0"),
    ("train.py", ["--beta2=-0.5"], "--beta2=-0.5"),
    ("train.py", ["--warmup_iters=-1"], "--warmup_iters=-1"),
    ("train.py", ["--learning_rate=nan"], "--learning_rate=nan"),
    ("train.py", ["--dtype=fp8"], "--dtype=fp8"),
    ("train.py", ["--engram_rows_per_head=10000000000"], "--engram_rows_per_head=10000000000"),  # ~19 TiB
    ("train.py", ["--max_iters"], "--max_iters needs a value"),
    ("train.py", ["--device=tpu"], "--device=tpu"),
    ("train.py", ["--engram_weight_decay=0.1", "--engram_sparse=true"], "--engram_sparse=false"),
    ("sample.py", ["--temperature=-1"], "--temperature=-1"),
    ("sample.py", ["--top_k=-5"], "--top_k=-5"),
    ("sample.py", ["--max_new_tokens=0"], "--max_new_tokens=0"),
    *([("sample.py", ["--device=cuda"], "no CUDA GPU"), ("train.py", ["--device=cuda"], "no CUDA GPU")]
      if not torch.cuda.is_available() else []),
    ("compare.py", ["--seeds=0"], "--seeds=0"),
    ("compare.py", ["--iso_share=2"], "--iso_share=2"),
    ("bench.py", ["--steps=-1"], "--steps=-1"),
    ("bench.py", ["--stepz=3"], "--steps"),
    ("data.py", ["--vocab=small"], "--vocab=small"),
]


@pytest.mark.parametrize("script,args,fragment", BAD_VALUES, ids=[f"{c[0]} {' '.join(c[1])}" for c in BAD_VALUES])
def test_bad_values_are_one_line_errors(script, args, fragment, tmp_path):
    where = {"data.py": [f"--data_dir={tmp_path / 'data'}"], "bench.py": []}.get(script, [f"--out_dir={tmp_path / 'out'}"])
    proc = run(script, *args, *where)
    assert proc.returncode == 2
    one_line_error(proc.stderr, fragment)
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()  # failed before any work


@pytest.mark.parametrize("script", ["train.py", "sample.py", "compare.py", "bench.py", "data.py"])
def test_help_lists_every_flag_with_default_and_meaning(script):
    proc = run(script, "--help")
    assert proc.returncode == 0 and proc.stderr == ""
    doc, flags = proc.stdout.split("\nFlags", 1)
    assert doc.strip()  # the script's docstring first
    flag_lines = [line.strip() for line in flags.splitlines() if line.strip().startswith("--")]
    assert len(flag_lines) >= 3
    # every flag line: --name=default, then a description written beside the field in its dataclass
    described = [line for line in flag_lines if len(line.split(None, 1)) == 2]
    assert len(described) == len(flag_lines), [line for line in flag_lines if line not in described]
    if script == "train.py":  # grouped by config, the nested model configs included
        for group in ("TrainConfig (train.py)", "DataConfig (data.py)", "GPTConfig (model.py)",
                      "MLAConfig (mla.py)", "MoEConfig (moe.py)", "EngramConfig (engram.py)"):
            assert group in proc.stdout
        assert "--max_iters=2000" in proc.stdout and "--engram_sparse=" in proc.stdout
    assert run(script, "-h").stdout == proc.stdout


# ----------------------------------------------------------------------------- the run folder

def test_fresh_run_refuses_an_out_dir_that_holds_a_run(trained, prepared, tmp_path):
    before = snapshot(trained)
    proc = run("train.py", *TINY, *data_flags(prepared), f"--out_dir={trained}", "--max_iters=2")
    assert proc.returncode == 2
    one_line_error(proc.stderr, f"--out_dir={trained}", "--resume", "--overwrite=true")
    assert snapshot(trained) == before  # log.jsonl and ckpt.pt untouched
    copy = copy_run(trained, tmp_path / "copy")
    proc = run("train.py", *TINY, *data_flags(prepared), f"--out_dir={copy}", "--max_iters=2", "--eval_interval=2",
               "--overwrite=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [json.loads(line)["iter"] for line in (copy / "log.jsonl").read_text().splitlines()] == [0, 2]


@pytest.mark.parametrize("where", ["a_file", "/proc/nano-engram-out"])
def test_out_dir_that_cannot_be_written_fails_before_training(where, prepared, tmp_path):
    out = tmp_path / "a_file" if where == "a_file" else Path(where)
    if where == "a_file":
        out.write_text("not a folder")
    proc = run("train.py", *TINY, *data_flags(prepared), f"--out_dir={out}", "--max_iters=2")
    assert proc.returncode == 2
    one_line_error(proc.stderr, "--out_dir=", "cannot write")
    assert "model:" not in proc.stdout  # before the model was even built


def test_resume_of_a_finished_run_says_so_and_how_to_extend(trained):
    before = snapshot(trained)
    proc = run("train.py", f"--out_dir={trained}", "--resume")
    assert proc.returncode == 0 and proc.stderr == ""
    assert "complete (6 of --max_iters=6 steps)" in proc.stdout and "--resume --max_iters=N" in proc.stdout
    assert snapshot(trained) == before


def test_extending_a_run_warns_that_the_cosine_moves(trained, tmp_path):
    copy = copy_run(trained, tmp_path / "run")
    proc = run("train.py", f"--out_dir={copy}", "--resume", "--max_iters=9")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--lr_decay_iters=6 keeps the old schedule" in proc.stdout
    assert "resuming at iter 6" in proc.stdout
    proc = run("train.py", f"--out_dir={copy}", "--resume", "--max_iters=12", "--lr_decay_iters=9")
    assert proc.returncode == 0 and "note:" not in proc.stdout  # a fixed decay length: nothing moves


def test_resume_with_a_checkpoint_whose_config_does_not_fit_its_weights(trained, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ckpt = torch.load(trained / "ckpt.pt", weights_only=False)
    ckpt["config"]["model"]["n_embd"] = 64
    ckpt["config"]["model"]["n_head"] = 4
    torch.save(ckpt, run_dir / "ckpt.pt")
    before = snapshot(run_dir)
    proc = run("train.py", f"--out_dir={run_dir}", "--resume", "--max_iters=9")
    assert proc.returncode == 2
    one_line_error(proc.stderr, "do not fit")
    assert snapshot(run_dir) == before


def test_resume_survives_a_truncated_config_json(trained, tmp_path):
    """config.json is for people; --resume reads the config stored in the checkpoint."""
    run_dir = copy_run(trained, tmp_path / "run")
    (run_dir / "config.json").write_text('{"out_dir": "ou')
    proc = run("train.py", f"--out_dir={run_dir}", "--resume", "--max_iters=9")
    assert proc.returncode == 0, proc.stderr[-2000:]
    json.loads((run_dir / "config.json").read_text())  # rewritten whole


def test_full_disk_while_saving_keeps_the_previous_checkpoint(trained, prepared, tmp_path, monkeypatch, capsys):
    run_dir = copy_run(trained, tmp_path / "run")
    (run_dir / "ckpt.pt.tmp").write_bytes(b"left by a crash")  # a stale partial save: cleaned at start
    good = (run_dir / "ckpt.pt").read_bytes()

    def full_disk(state, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        train.main([f"--out_dir={run_dir}", "--resume", "--max_iters=9"])
    assert exit_info.value.code == 2
    one_line_error(capsys.readouterr().err, "could not save", "the previous checkpoint is kept")
    assert (run_dir / "ckpt.pt").read_bytes() == good
    assert not list(run_dir.glob("*.tmp"))


def test_sigterm_saves_a_step_boundary_like_ctrl_c(prepared, tmp_path):
    out = tmp_path / "run"
    common = TINY + data_flags(prepared) + ["--max_iters=400", "--eval_interval=50"]
    child = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *common, f"--out_dir={out}"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while not (out / "log.jsonl").exists() and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)  # until past the first evaluation
    time.sleep(0.5)
    child.send_signal(signal.SIGTERM)  # what `timeout` and job schedulers send
    out_text, err = child.communicate(timeout=120)
    skip_if_exercise(err)
    assert child.returncode == 128 + signal.SIGTERM, err[-2000:]
    stopped = torch.load(out / "ckpt.pt", weights_only=False)["iter"]
    assert 0 < stopped < 400 and f"saved {out / 'ckpt.pt'} at iter {stopped}" in out_text
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["iter"] == stopped  # the steps since the last evaluation were kept, not lost


# ----------------------------------------------------------------------------- data through train.py

def test_a_damaged_token_file_is_rebuilt_not_trained_on(prepared, tmp_path):
    data_dir = tmp_path / "data"
    proc = run("data.py", f"--source={prepared['source']}", f"--data_dir={data_dir}")
    assert proc.returncode == 0, proc.stderr
    whole = (data_dir / "train.bin").read_bytes()
    (data_dir / "train.bin").write_bytes(whole[:len(whole) // 3])  # truncated
    proc = run("train.py", *TINY, f"--source={prepared['source']}", f"--data_dir={data_dir}",
               f"--out_dir={tmp_path / 'out'}", "--max_iters=2", "--eval_interval=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "preparing the data again" in proc.stdout
    assert (data_dir / "train.bin").read_bytes() == whole


def test_data_py_then_train_py_tokenize_once(prepared, tmp_path):
    data_dir = tmp_path / "data"
    assert run("data.py", f"--source={prepared['source']}", f"--data_dir={data_dir}").returncode == 0
    stamp = (data_dir / "train.bin").stat().st_mtime_ns
    proc = run("train.py", *TINY, f"--source={prepared['source']}", f"--data_dir={data_dir}",
               f"--out_dir={tmp_path / 'out'}", "--max_iters=2", "--eval_interval=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "data: wrote" not in proc.stdout and (data_dir / "train.bin").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("damage,fragment", [("data_dir_is_a_file", "data_dir"), ("corrupt_gzip", "train.txt.gz")])
def test_bad_data_through_train_py_is_one_line(damage, fragment, tmp_path):
    source, data_dir = tmp_path / "src", tmp_path / "data"
    source.mkdir()
    if damage == "data_dir_is_a_file":
        (source / "train.txt").write_text("Once upon a time.\n<|endoftext|>\n" * 50)
        data_dir.write_text("I am a file")
    else:
        (source / "train.txt.gz").write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    proc = run("train.py", *TINY, f"--source={source}", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}")
    assert proc.returncode == 2
    one_line_error(proc.stderr, fragment)
    if damage == "data_dir_is_a_file":
        assert data_dir.read_text() == "I am a file"


# ----------------------------------------------------------------------------- sample.py

def test_sample_bad_prompt_file_and_gates_png(trained, tmp_path):
    binary = tmp_path / "prompt.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    proc = run("sample.py", f"--out_dir={trained}", f"--start=FILE:{binary}")
    assert proc.returncode == 2
    one_line_error(proc.stderr, f"--start=FILE:{binary}", "UTF-8")
    proc = run("sample.py", f"--out_dir={trained}", "--show_gates", "--gates_png=/proc/nano-engram/gates.png")
    assert proc.returncode == 2
    one_line_error(proc.stderr, "--gates_png=")
    assert "--- sample" not in proc.stdout  # failed before sampling


def test_sample_generates_the_full_length_past_block_size(trained, tmp_path):
    """block_size is 32: 80 new tokens need the sliding window (GPT.generate)."""
    proc = run("sample.py", f"--out_dir={trained}", "--num_samples=1", "--max_new_tokens=80", "--temperature=1.0",
               "--stop_at_eot=false", "--start=Once upon a time")
    assert proc.returncode == 0, proc.stderr
    from data import Tokenizer
    ckpt = torch.load(trained / "ckpt.pt", weights_only=False)
    text = proc.stdout.split("--- sample 1/1\n", 1)[1]
    new_text = text[len("Once upon a time"):]
    assert len(Tokenizer.from_meta(ckpt["meta"]).encode(new_text)) >= 70  # re-encoding may merge a few


def test_sample_warns_about_prompt_tokens_outside_the_vocabulary(trained):
    proc = run("sample.py", f"--out_dir={trained}", "--num_samples=1", "--max_new_tokens=3",
               "--start=量子色力学 Once")
    assert proc.returncode == 0
    warning = one_line_error(proc.stderr, "became <unk>")
    assert warning.startswith("warning:")


# ----------------------------------------------------------------------------- the end of a run

def test_end_of_run_summary_and_loss_plot(prepared, tmp_path):
    out = tmp_path / "run"
    proc = run("train.py", *TINY, *data_flags(prepared), f"--out_dir={out}", "--max_iters=6", "--eval_interval=3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert last.startswith(f"done: val loss {log[-1]['val_loss']:.4f} ({log[-1]['val_bpb']:.4f} bits per byte) "
                           "after 6 steps, 1,536 tokens")
    assert "tok/s" in last and str(out / "ckpt.pt") in last and str(out / "log.jsonl") in last
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert all(r["train_loss_last"] is not None and r["train_loss_mean"] is not None for r in log[1:])


# ----------------------------------------------------------------------------- the GPU paths, on a CPU

def test_gpu_preset_with_bf16_autocast_runs_on_a_cpu(prepared, tmp_path):
    """--preset=gpu as it is (8 x 512, 16 experts, 65K-row Engram tables) with bf16 autocast, shrunk
    only in batch, context and steps so that it fits a test."""
    out = tmp_path / "gpu"
    proc = run("train.py", "--preset=gpu", "--device=cpu", "--dtype=bfloat16", "--batch_size=2", "--block_size=64",
               "--eval_iters=1", "--max_iters=2", "--eval_interval=2", *data_flags(prepared), f"--out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == [0, 2] and all(torch.isfinite(torch.tensor(r["val_loss"])) for r in log)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["n_embd"] == 512 and cfg["dtype"] == "bfloat16"


def test_compile_trains_a_few_steps(prepared, tmp_path):
    out = tmp_path / "compiled"
    proc = run("train.py", *TINY, *data_flags(prepared), f"--out_dir={out}", "--compile", "--max_iters=3",
               "--eval_interval=3", timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    eager = tmp_path / "eager"
    assert run("train.py", *TINY, *data_flags(prepared), f"--out_dir={eager}", "--max_iters=3",
               "--eval_interval=3").returncode == 0
    compiled_log, eager_log = ([json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
                               for d in (out, eager))
    assert compiled_log[-1]["val_loss"] == pytest.approx(eager_log[-1]["val_loss"], abs=1e-3)


# ----------------------------------------------------------------------------- torchrun

def torchrun(*args, start_new_session=False):
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={port}", str(ROOT / "train.py"), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=start_new_session,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def our_lines(stderr):
    """stderr without torchrun's own failure report (which it prints after any non-zero exit)."""
    return [line for line in stderr.splitlines() if line.startswith("error:") or "train.py\", line" in line]


def test_torchrun_bad_flag_is_one_line_from_rank_0_only():
    proc = torchrun("--n_layr=2")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    lines = our_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: unknown flag --n_layr; did you mean --n_layer")


def test_torchrun_ctrl_c_ends_cleanly_at_a_step_boundary(prepared, tmp_path):
    out = tmp_path / "ddp"
    proc = torchrun(*TINY, *data_flags(prepared), f"--out_dir={out}", "--max_iters=3000", "--eval_interval=5",
                    start_new_session=True)
    deadline = time.time() + 240
    while not (out / "ckpt.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    if proc.poll() is None:  # (a torchrun that ended at once has no process group left to signal)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: torchrun and both workers get it
    out_text, err = proc.communicate(timeout=240)
    skip_if_exercise(err)
    assert "KeyboardInterrupt" not in err and not our_lines(err), err[-3000:]
    assert "FutureWarning" not in err
    stopped = torch.load(out / "ckpt.pt", weights_only=False)["iter"]
    assert f"at iter {stopped}; continue with --resume" in out_text
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["iter"] == stopped


# ----------------------------------------------------------------------------- issue 23: hostile input, round two
# In-process (script.main(argv) with capsys), so that the whole table costs seconds: each case exits 2 with
# one line. Numbers (families 1-2), devices (4) and sizes (3) for every script; then the run folder (5).

def main_of(script):
    import importlib
    return importlib.import_module(script.removesuffix(".py")).main


def in_process_error(script, args, capsys, code=2):
    """script.main(args) must exit with code and print one line on stderr; returns the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main_of(script)(args)
    assert exit_info.value.code == code
    return one_line_error(capsys.readouterr().err)


NO_GPU = not torch.cuda.is_available()
HOSTILE = [
    # finite numbers (family 1)
    ("train.py", ["--learning_rate=inf"], "--learning_rate=inf"),
    ("train.py", ["--min_lr=nan"], "--min_lr=nan"),
    ("train.py", ["--grad_clip=inf"], "--grad_clip=inf"),
    ("train.py", ["--rope_theta=inf"], "--rope_theta=inf"),
    ("train.py", ["--hc_eps=inf"], "--hc_eps=inf"),
    ("train.py", ["--engram_lr_mult=nan"], "--engram_lr_mult=nan"),
    ("train.py", ["--aux_loss_alpha=inf"], "--aux_loss_alpha=inf"),
    ("sample.py", ["--temperature=inf"], "--temperature=inf"),
    ("sample.py", ["--temperature=nan"], "--temperature=nan"),
    ("compare.py", ["--iso_share=nan"], "--iso_share=nan"),
    ("data.py", ["--max_train_mb=inf"], "--max_train_mb=inf"),
    ("data.py", ["--max_train_mb=1e-9"], "less than one byte"),  # would round to 0 bytes: "all of it"
    # signs, seeds and int64 (family 2)
    ("train.py", ["--weight_decay=-0.1"], "--weight_decay=-0.1"),
    ("train.py", ["--engram_lr_mult=-1"], "--engram_lr_mult=-1"),
    ("train.py", ["--route_scale=-2"], "--route_scale=-2"),
    ("train.py", ["--bias_update_speed=-0.01"], "--bias_update_speed=-0.01"),
    ("train.py", ["--hc_lr_mult=-1"], "--hc_lr_mult=-1"),
    ("train.py", ["--hc_eps=-1e-6"], "--hc_eps=-1e-06"),
    ("train.py", ["--min_lr=0.01"], "--min_lr=0.01 is above --learning_rate"),
    ("train.py", ["--seed=-1"], "--seed=-1: a seed"),
    ("train.py", [f"--seed={2**64}"], f"--seed={2**64}"),
    ("train.py", ["--engram_seed=-3"], "--engram_seed=-3"),
    ("train.py", [f"--max_iters={10**30}"], "too large"),
    ("train.py", [f"--batch_size={2**63}"], "too large"),
    ("sample.py", ["--seed=-1"], "--seed=-1"),
    ("sample.py", [f"--top_k={10**20}"], "too large"),
    ("sample.py", [f"--max_new_tokens={10**20}"], "too large"),
    ("compare.py", ["--seed=-5"], "--seed=-5"),
    ("compare.py", [f"--seed={2**63 - 1}"], "below 2^63"),
    ("bench.py", [f"--steps={10**20}"], "too large"),
    ("exercises.py", ["--list=maybe"], "--list=maybe"),  # exercises.py has no numbers: its bools and names
    ("exercises.py", ["--only=no_such_exercise"], "no_such_exercise"),
    # devices (family 4): only auto, cpu, cuda, cuda:N and mps, before torch touches one
    *[("train.py", [f"--device={d}"], "expected auto, cpu, cuda, cuda:N or mps")
      for d in ("xpu", "meta", "hip", "vulkan", "cuda:abc", "cuda:-1", "cpu:0", "")],
    ("train.py", ["--device=cuda:99"], "no CUDA GPU" if NO_GPU else "cuda:99"),
    ("sample.py", ["--device=meta"], "expected auto, cpu"),
    ("sample.py", ["--device=xpu"], "--device=xpu"),
    ("compare.py", ["--device=vulkan"], "--device=vulkan"),
]


@pytest.mark.parametrize("script,args,fragment", HOSTILE, ids=[f"{c[0]} {' '.join(c[1])}" for c in HOSTILE])
def test_hostile_values_are_one_line_errors(script, args, fragment, prepared, tmp_path, capsys):
    where = {"data.py": [f"--data_dir={tmp_path / 'data'}"], "bench.py": [], "exercises.py": [f"--out={tmp_path / 'out'}"],
             "train.py": [f"--out_dir={tmp_path / 'out'}", *data_flags(prepared)]}.get(script, [f"--out_dir={tmp_path / 'out'}"])
    line = in_process_error(script, [*args, *where], capsys)
    assert fragment in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()  # failed before any work


SIZES = [  # family 3: estimated from the config (model.step_bytes) before anything is allocated
    (["--batch_size=1000000000"], "lower --batch_size"),
    (["--block_size=10000000"], "--block_size"),
    (["--hc_mult=100000"], "lower --hc_mult"),
    (["--n_embd=1000000", "--n_head=8"], "lower --n_embd"),
    (["--engram_rows_per_head=10000000000"], "--engram_rows_per_head"),
]


@pytest.mark.parametrize("args,fragment", SIZES, ids=[" ".join(c[0]) for c in SIZES])
def test_sizes_that_cannot_fit_are_one_line_errors(args, fragment, prepared, tmp_path, capsys):
    out = tmp_path / "out"
    line = in_process_error("train.py", [*TINY, *data_flags(prepared), f"--out_dir={out}", *args], capsys)
    assert fragment in line and "GiB" in line, line
    assert not out.exists() or not list(out.iterdir())  # no lock, no file left


def test_many_sinkhorn_iterations_warn_with_the_time_per_step():
    from mhc import MHCConfig
    cfg = train.config(["--device=cpu", "--preset=cpu", "--engram_rows_per_head=101", "--hc_mult=4",
                              "--hc_sinkhorn_iters=5000"])
    note = mhc.sinkhorn_warning(cfg.model, cfg.batch_size, cfg.device)
    assert note.startswith("warning: --hc_sinkhorn_iters=5000") and " s in Sinkhorn" in note and "\n" not in note
    assert mhc.sinkhorn_warning(train.GPTConfig(mhc=MHCConfig(hc_mult=4)), cfg.batch_size, cfg.device) == ""


def test_a_learning_rate_of_zero_freezes_the_weights(prepared, tmp_path):
    out = tmp_path / "frozen"
    train.main(TINY + data_flags(prepared) + [f"--out_dir={out}", "--max_iters=2", "--eval_interval=2",
                                              "--learning_rate=0", "--min_lr=0"])
    state = torch.load(out / "ckpt.pt", weights_only=False)
    torch.manual_seed(state["config"]["seed"])
    from data import Tokenizer
    fresh = train.GPT(train.GPTConfig.from_dict(state["config"]["model"]), token_bytes=Tokenizer.from_meta(state["meta"]).token_bytes())
    for name, value in fresh.state_dict().items():
        if name in state["model"] and value.is_floating_point() and "bias" not in name.split(".")[-1]:
            assert torch.equal(state["model"][name], value), name  # not one weight moved (the router biases may)


# ----------------------------------------------------------------------------- the run folder (family 5)

@pytest.mark.parametrize("fault", ["data_error", "too_big"])
def test_overwrite_keeps_the_old_run_until_the_new_one_starts(fault, trained, prepared, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path / "run")
    before = snapshot(run_dir)
    bad = [f"--data_dir={tmp_path / 'a_file'}"] if fault == "data_error" else ["--batch_size=1000000000"]
    if fault == "data_error":
        (tmp_path / "a_file").write_text("not a folder")
    in_process_error("train.py", [*TINY, *data_flags(prepared), f"--out_dir={run_dir}", "--overwrite=true", *bad], capsys)
    assert snapshot(run_dir) == before and sorted(p.name for p in run_dir.iterdir()) == sorted(before)  # no lock


def test_overwrite_moves_the_old_run_aside_once_the_new_one_runs(trained, prepared, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path / "run")
    before = snapshot(run_dir)
    train.main(TINY + data_flags(prepared) + [f"--out_dir={run_dir}", "--overwrite=true", "--max_iters=2",
                                              "--eval_interval=2"])
    assert "is now in" in capsys.readouterr().out
    assert snapshot(run_dir / ".replaced") == before
    assert [json.loads(line)["iter"] for line in (run_dir / "log.jsonl").read_text().splitlines()] == [0, 2]
    assert not (run_dir / ".lock").exists()


def test_a_folder_that_holds_other_files_is_refused(prepared, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    (folder / "loss.png").write_bytes(b"someone else's plot")
    for extra in ([], ["--overwrite=true"]):
        line = in_process_error("train.py", [*TINY, *data_flags(prepared), f"--out_dir={folder}", *extra], capsys)
        assert f"--out_dir={folder}" in line and "notes.txt" in line, line
    assert sorted(p.name for p in folder.iterdir()) == ["loss.png", "notes.txt"]
    assert (folder / "loss.png").read_bytes() == b"someone else's plot"


def test_a_run_folder_is_locked_while_it_trains(trained, prepared, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path / "run")
    (run_dir / ".lock").write_text(str(os.getppid()))  # a live process that is not this one
    before = snapshot(run_dir)
    for args in ([f"--out_dir={run_dir}", "--resume", "--max_iters=9"],
                 [*TINY, *data_flags(prepared), f"--out_dir={run_dir}", "--overwrite=true"]):
        line = in_process_error("train.py", args, capsys)
        assert f"process {os.getppid()}" in line, line
    assert snapshot(run_dir) == before
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run_dir / ".lock").write_text(ended.stdout.strip())  # stale: that process has ended
    train.main([f"--out_dir={run_dir}", "--resume", "--max_iters=7"])
    assert torch.load(run_dir / "ckpt.pt", weights_only=False)["iter"] == 7
    assert not (run_dir / ".lock").exists()  # released at the end


def test_ctrl_c_at_start_up_and_while_sampling_is_one_line(trained, prepared, tmp_path, monkeypatch, capsys):
    import sample

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "load_or_prepare", ctrl_c)
    out = tmp_path / "out"
    assert "interrupted" in in_process_error("train.py", [*TINY, *data_flags(prepared), f"--out_dir={out}"], capsys,
                                             code=130)
    assert not list(out.iterdir())  # the lock went with it
    monkeypatch.setattr(sample, "stream_sample", ctrl_c)
    assert "interrupted" in in_process_error("sample.py", [f"--out_dir={trained}"], capsys, code=130)


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_never_damages_the_log_or_the_plot(trained, tmp_path, monkeypatch):
    import harness
    run_dir = copy_run(trained, tmp_path / "run")
    log, png = (run_dir / "log.jsonl").read_bytes(), (run_dir / "loss.png").read_bytes()
    real_open = open

    def open_full(path, mode="r", *args, **kwargs):
        if any(c in mode for c in "wa+"):
            f = real_open(path, mode, *args, **kwargs)
            f.write = full_disk  # the file is made, but no byte fits
            return f
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr(harness, "open", open_full, raising=False)
    with pytest.raises(harness.ConfigError, match="No space left on device"):
        harness.append_log(str(run_dir / "log.jsonl"), {"iter": 99, "val_loss": 1.0})
    with pytest.raises(harness.ConfigError, match="No space left"):
        harness.trim_log(str(run_dir / "log.jsonl"), 3)
    monkeypatch.setattr(plots.plt.Figure, "savefig", full_disk)
    with pytest.raises(harness.ConfigError, match="loss.png"):
        harness.save_figure(plots.losses(harness.read_log(str(run_dir / "log.jsonl"))), str(run_dir / "loss.png"))
    assert (run_dir / "log.jsonl").read_bytes() == log and (run_dir / "loss.png").read_bytes() == png
    assert not list(run_dir.glob("*.tmp"))


def test_a_full_disk_while_data_py_tokenizes_is_one_line(prepared, tmp_path, monkeypatch, capsys):
    import data

    def tokenize_full(stories, path, use_pool, desc):
        path.write_bytes(b"\0" * 100)
        full_disk()
    monkeypatch.setattr(data, "tokenize_to_file", tokenize_full)
    line = in_process_error("data.py", [f"--source={prepared['source']}", f"--data_dir={tmp_path / 'd'}"], capsys, code=1)
    assert "No space left on device" in line and str(tmp_path / "d") in line
    assert not list((tmp_path / "d").glob("*.tmp"))


def test_sample_works_from_a_read_only_run_folder(trained, monkeypatch, capsys, tmp_path):
    """(Simulated: the tests may run as root, whom chmod does not stop.) Sampling only reads; --show_gates and
    --engram_offload=disk need to write, and say so in one line."""
    import builtins
    import sample
    real_open = builtins.open

    def read_only(path, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and str(path).startswith(str(trained)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, mode, *args, **kwargs)
    before = snapshot(trained)
    monkeypatch.setattr(builtins, "open", read_only)
    sample.main([f"--out_dir={trained}", "--num_samples=1", "--max_new_tokens=5"])
    assert "--- sample 1/1" in capsys.readouterr().out
    assert "--gates_png" in in_process_error("sample.py", [f"--out_dir={trained}", "--show_gates"], capsys)
    assert "could not write" in in_process_error("sample.py", [f"--out_dir={trained}", "--engram_offload=disk"], capsys)
    monkeypatch.undo()
    assert snapshot(trained) == before
