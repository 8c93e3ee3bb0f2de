""".ci/gpu, the check anyone with a GPU runs first: without a GPU it says so in one line and does
nothing; GPU_CHECK_ON_CPU=1 runs its whole pipeline on the CPU with a tiny model, which is how its
steps and its summary are tested here (the numbers themselves only mean something on a GPU). The dry run
is the lent GPU machine's command (README.md), with $OUT set as the device tool sets it: what comes back
from there (the log, the summary, one archive) is checked against the tool's limits."""
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from scripts import skip_if_exercise

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "gpu"
KERNELS = ("engram_lookup", "moe_grouped_swiglu", "mla_decode")
# The lent machine's command (README.md, "Running .ci/gpu on a lent GPU"), run in the checkout's root with
# the data copied into shared/ first; the device tool allows one command 600 s, and .ci/gpu must end inside.
DEVICE_COMMAND, DEVICE_TIMEOUT_S = "bash .ci/gpu", 600
PREPARE = "mkdir -p shared && cp -r ../shared/tiktoken ../shared/tinystories-more shared/"
# What the device tool brings back from $OUT: at most 8 files of 16 MiB, named in letters, digits, '.', '_', '-'
RETURNED = {"gpu-check.log", "summary.txt", "summary.json", "gpu-check.tgz"}
RETURN_LIMIT = 16 * 2**20
# Where variables the check reads could come from the caller's shell
CHECK_ENV = ("GPU_CHECK_ON_CPU", "GPU_CHECK_DIR", "GPU_CHECK_BUDGET_S", "GPU_CHECK_STEPS", "OUT", "SOURCE")


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in CHECK_ENV}
    env.update(extra)
    return env


def device_command(env, timeout, cwd=ROOT):
    """DEVICE_COMMAND as the device tool runs it: bash, in the checkout's root."""
    done = subprocess.run(["bash", "-c", DEVICE_COMMAND], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)
    skip_if_exercise(done.stdout + done.stderr)  # a student copy: a step stopped at an unwritten exercise
    return done


def check_returned(ret):
    """The files in the $OUT folder ret, as the device tool would bring them back: all of them, within its limits."""
    files = sorted(p.name for p in ret.iterdir())
    assert set(files) == RETURNED, files
    for name in files:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", name) and (ret / name).is_file(), name
        assert 0 < (ret / name).stat().st_size < RETURN_LIMIT, name


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: .ci/gpu would run the real check")
def test_gpu_check_without_a_gpu_prints_one_line_and_writes_nothing(tmp_path):
    assert SCRIPT.is_file() and os.access(SCRIPT, os.X_OK)
    default_out = ROOT / "out-gpu"
    before = sorted(default_out.iterdir()) if default_out.exists() else None
    for args, env in (([], clean_env()), ([str(tmp_path / "run")], clean_env()),
                      ([], clean_env(OUT=str(tmp_path / "ret"), GPU_CHECK_DIR=str(tmp_path / "run")))):
        done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        lines = (done.stdout + done.stderr).splitlines()
        assert len(lines) == 1 and "no CUDA GPU" in lines[0], lines
    assert (sorted(default_out.iterdir()) if default_out.exists() else None) == before
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, run .ci/gpu itself")
def test_gpu_check_on_cpu_runs_every_step_and_brings_back_the_results(prepared, tmp_path):
    """The dry run: the device command on the CPU, every step, the summary and what $OUT brings back."""
    out, ret = tmp_path / "run", tmp_path / "ret"
    env = clean_env(GPU_CHECK_ON_CPU="1", SOURCE=prepared["source"], GPU_CHECK_DIR=str(out), OUT=str(ret))
    done = device_command(env, timeout=240)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    for name in ("summary.txt", "summary.json", "bench_kernels.jsonl", "sample.txt", "kernel_tests.xml",
                 "gpu.txt", "train-torch/log.jsonl", "train-triton/log.jsonl", "train-torch/loss.png",
                 "train-triton/loss.png"):
        assert (out / name).is_file(), name
    bench = [json.loads(line) for line in (out / "bench_kernels.jsonl").read_text().splitlines()]
    assert {r["kernel"] for r in bench if r.get("bench") == "kernel"} == set(KERNELS)
    assert (out / "sample.txt").read_text().strip()

    summary = (out / "summary.txt").read_text()
    assert summary in done.stdout
    for kernel in KERNELS:
        assert kernel in summary
    losses = {}
    for mode in ("torch", "triton"):
        last = json.loads((out / f"train-{mode}" / "log.jsonl").read_text().splitlines()[-1])
        assert last["iter"] == 6
        losses[mode] = last["val_loss"]
        assert f"train --kernels={mode}: 6 steps, final val loss {last['val_loss']:.4f}" in summary
    assert "all steps passed" in summary
    # Engram's tables in host memory: decoding against resident (the same tokens), and training with them
    assert "decode with host tables" in summary and "DIFFERENT TOKENS" not in summary
    assert "train --engram_offload=host: 3 steps" in summary

    report = json.loads((out / "summary.json").read_text())
    assert report["ok"] and all(s["ok"] for s in report["steps"])
    assert report["kernel_tests"]["passed"] > 0 and report["kernel_tests"]["failed"] == 0
    # in float32 on the CPU the kernels match the references closely: the runs agree
    assert report["train"]["agree"] and report["train"]["compared_at_iter"] == 6
    assert report["train"]["val_loss_diff"] == pytest.approx(losses["triton"] - losses["torch"])

    # what the device tool would bring back: the summary, everything printed, the run folder less its bulk
    check_returned(ret)
    assert (ret / "summary.txt").read_text() == summary
    assert json.loads((ret / "summary.json").read_text()) == report
    log = (ret / "gpu-check.log").read_text()
    assert summary in log and "== train-triton" in log
    with tarfile.open(ret / "gpu-check.tgz") as tgz:
        names = set(tgz.getnames())
    assert {"run/summary.txt", "run/kernel_tests.xml", "run/train-triton/log.jsonl", "run/train-host/log.jsonl",
            "run/train-triton/loss.png", "run/sample.txt", "run/offload_decode.log"} <= names, sorted(names)
    assert not [n for n in names if n.endswith((".pt", ".bin")) or n.startswith("run/data/")], sorted(names)
    # left out, not missing
    assert (out / "train-triton" / "ckpt.pt").is_file() and (out / "data" / "train.bin").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, run .ci/gpu itself")
def test_gpu_check_finds_the_data_in_shared_in_the_checkout_first(tmp_path):
    """On a lent machine only the checkout travels, with a shared/ folder inside it: .ci/gpu looks there
    first, then in ../shared beside the checkout. With no time budget every step is skipped (quick), and
    what was run still comes back."""
    repo, beside = tmp_path / "work" / "repo", tmp_path / "work" / "shared"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy2(SCRIPT, repo / ".ci" / "gpu")
    for folder in (repo / "shared" / "tinystories-more", beside / "tinystories-more", beside / "tiktoken"):
        folder.mkdir(parents=True)
    ret = tmp_path / "ret"
    env = clean_env(GPU_CHECK_ON_CPU="1", GPU_CHECK_BUDGET_S="0", OUT=str(ret), PYTHON=sys.executable)
    env.pop("TIKTOKEN_CACHE_DIR", None)
    done = device_command(env, timeout=60, cwd=repo)
    assert done.returncode == 1  # no step ran
    first = done.stdout.splitlines()[0]
    assert f"run folder {repo / 'out-gpu'}; data from {repo / 'shared' / 'tinystories-more'}; " \
           f"tokenizer files from {beside / 'tiktoken'}" in first, first
    assert "gpu_info: skipped" in done.stdout and "SOME STEPS FAILED" in done.stdout
    check_returned(ret)


def test_readme_gives_the_device_command_the_dry_run_uses():
    """README.md's instructions for a lent GPU machine: the one preparation step, and the dry run's command
    with a timeout_s that the check's own limits end inside (its budget, 10 s to kill a step, 15 for the
    summary, and packing the results)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert PREPARE in readme
    assert f"`{DEVICE_COMMAND}`" in readme and f"timeout_s={DEVICE_TIMEOUT_S}" in readme
    budget = int(re.search(r"GPU_CHECK_BUDGET_S:-(\d+)", SCRIPT.read_text()).group(1))
    assert budget + 10 + 15 + 30 <= DEVICE_TIMEOUT_S
