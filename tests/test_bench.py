"""bench.py runs on a CPU and prints one JSON object per line (its numbers are not asserted:
speed is claimed in bench output, not in tests)."""
import json

from scripts import run


def run_bench(*args, interpret=False):
    proc = run("bench.py", *args, env_extra={"TRITON_INTERPRET": "1"} if interpret else None, timeout=600,
               unset=("TRITON_INTERPRET",))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_backbone_bench_prints_cache_sizes_and_speeds():
    rows = run_bench("--steps=1")
    cache = [r for r in rows if r["bench"] == "kv_cache_bytes_per_token_per_layer"]
    assert cache and all(r["mla"] == 2 * (r["kv_lora_rank"] + r["qk_rope_head_dim"]) for r in cache)
    assert all(r["mha"] == 2 * 2 * r["n_embd"] for r in cache)  # bf16 K and V of every head
    speed = {r["model"]: r for r in rows if r["bench"] == "train_tokens_per_s"}
    assert set(speed) == {"mla+moe", "mha+dense", "mla+moe+engram"}
    active = [speed[m]["params_active"] for m in ("mla+moe", "mha+dense")]
    assert abs(active[0] - active[1]) / max(active) < 0.02  # matched active parameters


def test_kernel_bench_runs_without_a_gpu():
    rows = run_bench("--kernels")
    kernels = {r["kernel"] for r in rows if r["bench"] == "kernel"}
    assert kernels == {"engram_lookup", "moe_grouped_swiglu", "mla_decode"}
    if not any("cuda" in str(r.get("device")) for r in rows):
        assert all("PyTorch reference only" in r["device"] and "triton_ms" not in r
                   for r in rows if r["bench"] == "kernel")
