""".ci/gpu, the check anyone with a GPU runs first: without a GPU it says so in one line and does
nothing; GPU_CHECK_ON_CPU=1 runs its whole pipeline on the CPU with a tiny model, which is how its
steps and its summary are tested here (the numbers themselves only mean something on a GPU)."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from scripts import skip_if_exercise

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "gpu"
KERNELS = ("engram_lookup", "moe_grouped_swiglu", "mla_decode")


def run_check(*args, env_extra=None, timeout=120, cwd=ROOT):
    env = {**os.environ, **(env_extra or {})}
    done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    skip_if_exercise(done.stdout + done.stderr)  # a student copy: a step stopped at an unwritten exercise
    return done


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: .ci/gpu would run the real check")
def test_gpu_check_without_a_gpu_prints_one_line_and_writes_nothing(tmp_path):
    assert SCRIPT.is_file() and os.access(SCRIPT, os.X_OK)
    default_out = ROOT / "out-gpu"
    before = sorted(default_out.iterdir()) if default_out.exists() else None
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_ON_CPU"}
    for args in ([], [str(tmp_path / "out")]):
        done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        lines = (done.stdout + done.stderr).splitlines()
        assert len(lines) == 1 and "no CUDA GPU" in lines[0], lines
    assert (sorted(default_out.iterdir()) if default_out.exists() else None) == before
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, run .ci/gpu itself")
def test_gpu_check_on_cpu_runs_every_step_and_summarises(prepared, tmp_path):
    out = tmp_path / "out"
    done = run_check(str(out), env_extra={"GPU_CHECK_ON_CPU": "1", "SOURCE": prepared["source"]}, timeout=180)
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
