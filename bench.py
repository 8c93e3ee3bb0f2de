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
    """The model config of a train.py preset (Engram off: these benches are about the backbone)."""
    flags = [f"--preset={preset}", "--device=cpu", "--engram=off"] + [f"--{k}={v}" for k, v in overrides.items()]
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
    interleaved step by step."""
    moe_cfg = preset_model("cpu", attn="mla", ffn="moe")
    torch.manual_seed(0)
    contenders = {"mla+moe": GPT(moe_cfg).to(device)}
    contenders["mha+dense"] = GPT(matched_dense_config(contenders["mla+moe"].param_counts()["active"])).to(device)
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", action="store_true", help="benchmark the Triton kernels")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per model")
    args = ap.parse_args()
    if args.kernels:
        import kernels
        kernels.run_benchmarks(emit)
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bench_kv_cache()
    bench_train_speed(steps=args.steps, device=device)


if __name__ == "__main__":
    main()
