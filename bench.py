"""Benchmarks. Every figure is printed as one JSON object per line.

    python bench.py             # KV-cache bytes (MLA vs MHA), training tokens/s (MHA+dense vs MLA+MoE)
    python bench.py --kernels   # Triton kernels against their PyTorch references (needs a GPU for Triton)

Speed comparisons are measured side by side in one process, alternating the
contenders step by step, so that load from elsewhere on the machine hits both alike.
"""
import argparse
import json
import statistics
import time

import torch

from mla import MLAConfig
from model import GPT, Cache, GPTConfig
from engram import EngramConfig
from train import build_config


def emit(**record):
    print(json.dumps(record), flush=True)


def preset_model(preset, **overrides):
    """The model config of a train.py preset; Engram off unless engram="on" is passed (most benches
    here are about the backbone)."""
    overrides = {"engram": "off", **overrides}
    flags = [f"--preset={preset}", "--device=cpu"] + [f"--{k}={v}" for k, v in overrides.items()]
    cfg = build_config(flags).model
    cfg.vocab_size = 7000  # about the compact TinyStories vocabulary
    return cfg


def cache_bytes_per_token(cfg, dtype=torch.bfloat16):
    """Measure the decoding cache: run a prompt through the model and count what the cache holds."""
    model = GPT(cfg).to(dtype).eval()
    n_tokens = 16
    cache = Cache(cfg.n_layer)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (1, n_tokens)), cache=cache)
    stored = sum(t.numel() * t.element_size() for layer in cache.layers
                 for part in layer.values() for t in part.values())
    return stored / n_tokens


def bench_kv_cache():
    """Cache bytes per token and layer, MHA vs MLA at equal heads: this project's CPU and GPU
    preset shapes (default MLAConfig) and DeepSeek-V3's attention shape."""
    shapes = [(f"{p} preset", c.n_head, c.n_embd, c.mla) for p in ("cpu", "gpu") for c in [preset_model(p)]]
    shapes.append(("DeepSeek-V3", 128, 7168, MLAConfig(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                                                       qk_rope_head_dim=64, v_head_dim=128)))
    for label, n_head, n_embd, mla in shapes:
        row = {"bench": "kv_cache_bytes_per_token_per_layer", "shape": label, "dtype": "bfloat16",
               "n_head": n_head, "n_embd": n_embd, "kv_lora_rank": mla.kv_lora_rank,
               "qk_rope_head_dim": mla.qk_rope_head_dim}
        for attn in ("mha", "mla"):
            cfg = GPTConfig(vocab_size=256, block_size=64, n_layer=1, n_head=n_head, n_embd=n_embd, attn=attn,
                            ffn="dense", ffn_hidden=64, mla=mla, engram=EngramConfig(engram_layers=()))
            row[attn] = cache_bytes_per_token(cfg)
        row["mha_over_mla"] = round(row["mha"] / row["mla"], 2)
        emit(**row)


def matched_dense_config(target_active, attn="mha"):
    """A dense-FFN CPU-preset config with about target_active active parameters.
    Active parameters grow linearly with the FFN width, so two probes find the width."""
    a32, a64 = (GPT(preset_model("cpu", attn=attn, ffn="dense", ffn_hidden=h)).param_counts()["active"]
                for h in (32, 64))
    hidden = 32 + (target_active - a32) * 32 / (a64 - a32)
    return preset_model("cpu", attn=attn, ffn="dense", ffn_hidden=max(32, 32 * round(hidden / 32)))


def bench_train_speed(steps=20, batch_size=16, device="cpu"):
    """Training tokens/s of MHA+dense vs MLA+MoE (CPU preset backbone) at matched active parameters,
    and of MLA+MoE with Engram (the default model), interleaved step by step."""
    moe_cfg = preset_model("cpu", attn="mla", ffn="moe")
    torch.manual_seed(0)
    contenders = {"mla+moe": GPT(moe_cfg).to(device)}
    contenders["mha+dense"] = GPT(matched_dense_config(contenders["mla+moe"].param_counts()["active"])).to(device)
    # the default model: the same backbone plus Engram, to price the memory lookup
    contenders["mla+moe+engram"] = GPT(preset_model("cpu", engram="on")).to(device)
    opts = {k: m.configure_optimizer(1e-3, 0.1, (0.9, 0.95), device) for k, m in contenders.items()}
    times = {k: [] for k in contenders}
    T = moe_cfg.block_size
    for step in range(steps + 3):  # the first 3 steps warm up allocators and are not timed
        x = torch.randint(0, moe_cfg.vocab_size, (batch_size, T + 1), device=device)
        for name, model in contenders.items():
            t0 = time.perf_counter()
            _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if step >= 3:
                times[name].append(time.perf_counter() - t0)
    for name, model in contenders.items():
        counts = model.param_counts()
        median = statistics.median(times[name])
        emit(bench="train_tokens_per_s", model=name, device=device, batch=batch_size, block=T,
             params_total=counts["total"], params_active=counts["active"],
             tok_per_s=round(batch_size * T / median), step_ms_median=round(1000 * median, 1))


# ----------------------------------------------------------------------------- kernels

H200_PEAK = {"hbm_GB_s": 4800.0, "bf16_TFLOP_s": 989.0}  # datasheet: HBM3e bandwidth, dense bf16


def time_ms(fn, device):
    """Median milliseconds per call: triton.testing.do_bench on a GPU, a plain timer elsewhere."""
    fn()  # warm-up: compiles and autotunes the kernel
    if device == "cuda":
        from triton.testing import do_bench
        return do_bench(fn)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def engram_case(batch, seq, heads_per_order, rows_per_head, head_dim, device, dtype):
    """One Engram layer's lookup (orders 2 and 3): returns shape, call(mode), bytes moved."""
    import kernels
    from engram import EngramHasher
    cfg = EngramConfig(engram_layers=(0,), ngram_orders=(2, 3), engram_heads_per_order=heads_per_order,
                       engram_dim_per_order=heads_per_order * head_dim, engram_rows_per_head=rows_per_head)
    hasher = EngramHasher(cfg, vocab_size=32000).to(device)
    context = hasher.canonical_context(torch.randint(0, 32000, (batch, seq), device=device))
    n_rows = int(hasher.head_primes[0].sum())
    table = torch.randn(n_rows, head_dim, device=device, dtype=dtype)
    args = (context, hasher.multipliers[0], hasher.head_primes[0], hasher.head_offsets[0], hasher.ngram_orders,
            hasher.heads_per_order, table)
    n_heads = 2 * heads_per_order
    shape = {"tokens": batch * seq, "heads": n_heads, "head_dim": head_dim, "table_rows": n_rows}
    return shape, lambda mode: kernels.engram_lookup(*args, mode=mode), \
        kernels.engram_lookup_bytes(batch * seq, n_heads, head_dim, table.element_size()), None


def moe_case(n_tokens, n_experts, top_k, dim, inter_dim, device, dtype):
    """All routed experts' SwiGLU over expert-sorted rows (random top-k routing): FLOPs-bound."""
    import kernels
    expert_ids = torch.rand(n_tokens, n_experts, device=device).topk(top_k, dim=-1).indices.flatten()
    counts = torch.bincount(expert_ids, minlength=n_experts)
    x = torch.randn(n_tokens * top_k, dim, device=device, dtype=dtype)
    w1, w3 = (torch.randn(n_experts, inter_dim, dim, device=device, dtype=dtype) / dim ** 0.5 for _ in range(2))
    w2 = torch.randn(n_experts, dim, inter_dim, device=device, dtype=dtype) / inter_dim ** 0.5
    shape = {"tokens": n_tokens, "experts": n_experts, "top_k": top_k, "dim": dim, "inter_dim": inter_dim}
    flops = kernels.moe_grouped_swiglu_flops(n_tokens * top_k, dim, inter_dim)
    return shape, lambda mode: kernels.moe_grouped_swiglu(x, counts, w1, w3, w2, mode=mode), None, flops


def mla_case(batch, cache_len, n_heads, device, dtype, kv_lora_rank=512, rope_dim=64):
    """One decode step of absorbed MLA over a latent cache (DeepSeek-V3 dims): bandwidth-bound."""
    import kernels
    q = torch.randn(batch, n_heads, kv_lora_rank, device=device, dtype=dtype)
    q_rope = torch.randn(batch, n_heads, rope_dim, device=device, dtype=dtype)
    kv = torch.randn(batch, cache_len, kv_lora_rank, device=device, dtype=dtype)
    k_rope = torch.randn(batch, cache_len, rope_dim, device=device, dtype=dtype)
    scale = (128 + rope_dim) ** -0.5
    shape = {"batch": batch, "cache_len": cache_len, "heads": n_heads, "kv_lora_rank": kv_lora_rank}
    return shape, lambda mode: kernels.mla_decode_attention(q, q_rope, kv, k_rope, scale, mode=mode), \
        kernels.mla_decode_bytes(batch, n_heads, cache_len, kv_lora_rank, rope_dim, kv.element_size()), None


def bench_kernels():
    """Each kernel against its PyTorch reference. On a CPU only the references run, on small shapes,
    so that a reader without a GPU still gets output (and unless TRITON_INTERPRET=1 is set, which
    runs the kernels in the interpreter: a correctness path whose timings mean nothing)."""
    import kernels
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    run_triton = kernels.HAVE_TRITON and (gpu or kernels.INTERPRET)
    label = torch.cuda.get_device_name() if gpu else (
        "cpu: Triton interpreter, timings meaningless" if run_triton else "cpu: PyTorch reference only (no GPU)")
    if gpu:
        dtype = torch.bfloat16
        cases = [("engram_lookup", engram_case(64, 2048, 8, 65537, 32, device, dtype)),
                 ("moe_grouped_swiglu", moe_case(8192, 64, 6, 1024, 512, device, dtype)),
                 ("moe_grouped_swiglu", moe_case(8192, 64, 6, 2048, 1408, device, dtype))]
        cases += [("mla_decode", mla_case(b, s, h, device, dtype)) for b, s, h in
                  ((64, 8192, 16), (64, 8192, 128), (128, 4096, 16), (64, 32768, 16))]
    else:
        dtype = torch.float32
        cases = [("engram_lookup", engram_case(2, 64, 2, 1009, 16, device, dtype)),
                 ("moe_grouped_swiglu", moe_case(64, 8, 2, 32, 16, device, dtype)),
                 ("mla_decode", mla_case(2, 100, 4, device, dtype, kv_lora_rank=32, rope_dim=16))]
    for name, (shape, call, n_bytes, flops) in cases:
        row = {"bench": "kernel", "kernel": name, "device": label, "dtype": str(dtype).replace("torch.", ""), **shape}
        impls = ["torch", "triton"] if run_triton else ["torch"]
        with torch.no_grad():
            for impl in impls:
                row[f"{impl}_ms"] = round(time_ms(lambda: call(impl), device), 4)
            if run_triton:  # recorded, not asserted: one miss must not cost the rest of a GPU run
                row["max_abs_err"] = float((call("triton").float() - call("torch").float()).abs().max())
                row["speedup"] = round(row["torch_ms"] / row["triton_ms"], 2)
        if gpu:  # achieved throughput of each implementation, against the H200's peak
            for impl in impls:
                ms = row[f"{impl}_ms"]
                if n_bytes is not None:
                    row[f"{impl}_GB_s"] = round(n_bytes / ms / 1e6, 1)
                    row[f"{impl}_frac_of_H200_HBM"] = round(row[f"{impl}_GB_s"] / H200_PEAK["hbm_GB_s"], 3)
                if flops is not None:
                    row[f"{impl}_TFLOP_s"] = round(flops / ms / 1e9, 2)
                    row[f"{impl}_frac_of_H200_bf16"] = round(row[f"{impl}_TFLOP_s"] / H200_PEAK["bf16_TFLOP_s"], 3)
        emit(**row)
    if gpu:
        bench_end_to_end(device)
    else:
        emit(bench="end_to_end", note="skipped: --kernels=torch vs triton training and sampling need a CUDA GPU")


def bench_end_to_end(device, steps=10):
    """GPU preset model: training tokens/s and sampling tokens/s with --kernels=torch vs triton."""
    cfg = build_config(["--preset=gpu", f"--device={device}"])
    cfg.model.vocab_size = 7000
    models = {}
    for mode in ("torch", "triton"):
        torch.manual_seed(0)
        cfg.model.kernels = mode
        models[mode] = GPT(GPTConfig.from_dict(cfg.model.to_dict())).to(device)
    opts = {k: m.configure_optimizer(1e-4, 0.1, (0.9, 0.95), "cuda") for k, m in models.items()}
    B, T = cfg.batch_size // 4, cfg.model.block_size
    times = {k: [] for k in models}
    for step in range(steps + 2):
        x = torch.randint(0, 7000, (B, T + 1), device=device)
        for mode, model in models.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            opts[mode].step()
            opts[mode].zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if step >= 2:
                times[mode].append(time.perf_counter() - t0)
    for mode in models:
        emit(bench="end_to_end_train", kernels=mode, batch=B, block=T,
             tok_per_s=round(B * T / statistics.median(times[mode])))
    for mode, model in models.items():
        model.eval()
        prompt = torch.randint(0, 7000, (32, 16), device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            list(model.generate(prompt, 8, temperature=0))  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            list(model.generate(prompt, 256, temperature=0))
            torch.cuda.synchronize()
        emit(bench="end_to_end_sample", kernels=mode, batch=32, new_tokens=256,
             tok_per_s=round(32 * 256 / (time.perf_counter() - t0)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", action="store_true", help="benchmark the Triton kernels")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per model")
    args = ap.parse_args()
    if args.kernels:
        bench_kernels()
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bench_kv_cache()
    bench_train_speed(steps=args.steps, device=device)


if __name__ == "__main__":
    main()
