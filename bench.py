"""Benchmarks. Every figure is printed as one JSON object per line.

    python bench.py                    # KV-cache bytes (MLA vs MHA), training tokens/s (MHA+dense vs MLA+MoE)
    python bench.py --kernels          # Triton kernels against their PyTorch references (needs a GPU for Triton)
    python bench.py --engram_scaling   # step time against Engram table size, dense vs sparse table training
    python bench.py --mhc              # mHC's step-time overhead (4 residual streams vs 1), eager and compiled
    python bench.py --engram_memory    # tables beyond one device: sharded vs replicated (2 gloo ranks), and
                                       # decoding with resident, host and disk tables (memory.py)

Speed comparisons are measured side by side in one process, alternating the
contenders step by step, so that load from elsewhere on the machine hits both alike.
"""
import gc
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch

import cli
import engram
import kernels
import memory
import mla
import moe
import train
from engram import EngramConfig, TokenizerCompression, hash_multipliers, head_table_sizes, table_params
from harness import wrap_ddp
from mla import MLAConfig
from model import GPT, Cache, GPTConfig, dense_ffn_hidden


@dataclass
class BenchConfig:
    kernels: bool = False             # benchmark the Triton kernels against their PyTorch references
    engram_scaling: bool = False      # step time against Engram table size: dense vs sparse table training
    mhc: bool = False                 # step time with 4 residual streams (mhc.py) against 1, eager and torch.compile
    engram_memory: bool = False       # sharded against replicated tables on 2 ranks, and decoding from host and disk tables
    steps: int = 0                    # timed steps per model; 0 = 20 (with --engram_scaling: 8 per path and size)

    def __post_init__(self):
        cli.check_numbers(self, nonneg=("steps",))


def emit(**record):
    print(json.dumps(record), flush=True)


def preset_model(preset, **overrides):
    """The model config of a train.py preset; Engram off unless engram="on" is passed (most benches
    here are about the backbone)."""
    # the preset's table for a full train split, so that no data is read to size it (cli.rows_for_split)
    overrides = {"engram": "off", "engram_rows_per_head": cli.ROWS, **overrides}
    flags = [f"--preset={preset}", "--device=cpu"] + [f"--{k}={v}" for k, v in overrides.items()]
    cfg = train_config(flags).model
    cfg.vocab_size = 7000  # about the compact TinyStories vocabulary
    return cfg


def train_config(flags):
    """train.py's config for these flags (its defaults and presets; nothing here needs data to size it)."""
    return cli.train_config(flags, train.TrainConfig(), train.PRESETS, train.__doc__)


class SameBatch:
    """train.train_step's batch source when every contender trains on the same batch: this step's (x, y)."""

    def __init__(self, x):
        self.batch = (x[:, :-1], x[:, 1:])

    def next(self):
        return self.batch

    def peek(self):
        return self.batch


def timed_step(model, batch, optimizers, tables):
    """One training step as train.py takes it (train.train_step: forward, backward, the tables' gradients,
    clipping at 1.0), then the optimizers' step, in float32."""
    train.train_step(model, batch, optimizers, NO_SCALING, nullcontext(), STEP, tables)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)


STEP, NO_SCALING = train.TrainConfig(grad_clip=1.0), torch.amp.GradScaler("cpu", enabled=False)


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
    for label, n_head, n_embd, attn_cfg in shapes:
        row = {"bench": "kv_cache_bytes_per_token_per_layer", "shape": label, "dtype": "bfloat16",
               "n_head": n_head, "n_embd": n_embd, "kv_lora_rank": attn_cfg.kv_lora_rank,
               "qk_rope_head_dim": attn_cfg.qk_rope_head_dim}
        for attn in ("mha", "mla"):
            cfg = GPTConfig(vocab_size=256, block_size=64, n_layer=1, n_head=n_head, n_embd=n_embd, attn=attn,
                            ffn="dense", ffn_hidden=64, mla=attn_cfg, engram=EngramConfig(engram_layers=()))
            row[attn] = cache_bytes_per_token(cfg)
        row["mha_over_mla"] = round(row["mha"] / row["mla"], 2)
        emit(**row)


def matched_dense_config(target_active, attn="mha"):
    """A dense-FFN CPU-preset config with about target_active active parameters (width a multiple of 32)."""
    cfg = preset_model("cpu", attn=attn, ffn="dense")
    return replace(cfg, ffn_hidden=dense_ffn_hidden(cfg, target_active, multiple=32))


def bench_train_speed(steps=20, batch_size=16, device="cpu"):
    """Training tokens/s of MHA+dense vs MLA+MoE (CPU preset backbone) at matched active parameters,
    and of MLA+MoE with Engram (the default model), interleaved step by step."""
    moe_cfg = preset_model("cpu", attn="mla", ffn="moe")
    torch.manual_seed(0)
    contenders = {"mla+moe": GPT(moe_cfg).to(device)}
    contenders["mha+dense"] = GPT(matched_dense_config(contenders["mla+moe"].param_counts()["active"])).to(device)
    # the default model: the same backbone plus Engram, to price the memory lookup
    contenders["mla+moe+engram"] = GPT(preset_model("cpu", engram="on")).to(device)
    T = moe_cfg.block_size
    times = interleaved_step_times(contenders, steps, batch_size, T, moe_cfg.vocab_size, device)
    for name, model in contenders.items():
        counts = model.param_counts()
        median = statistics.median(times[name])
        emit(bench="train_tokens_per_s", model=name, device=device, batch=batch_size, block=T,
             params_total=counts["total"], params_active=counts["active"],
             tok_per_s=round(batch_size * T / median), step_ms_median=round(1000 * median, 1))


def interleaved_step_times(models, steps, batch_size, block_size, vocab_size, device, warmup=3):
    """{name: [seconds per training step]}: forward, backward, gradient clipping and the optimizer
    step of every model on the same batch, the models taking turns step by step (the first warmup
    steps, which warm up allocators, are not timed)."""
    optimizers = {k: m.configure_optimizers(1e-3, 0.1, (0.9, 0.95), device) for k, m in models.items()}
    tables = {k: memory.Tables(m, device) for k, m in models.items()}
    times = {k: [] for k in models}
    for step in range(steps + warmup):
        batch = SameBatch(torch.randint(0, vocab_size, (batch_size, block_size + 1), device=device))
        for name, model in models.items():
            t0 = time.perf_counter()
            timed_step(model, batch, optimizers[name], tables[name])
            if device == "cuda":  # GPU work is asynchronous: wait for it before reading the clock
                torch.cuda.synchronize()
            if step >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def bench_engram_scaling(steps=8, batch_size=16, device="cpu"):
    """Step time of the CPU preset backbone with Engram tables of about 0.5M, 8M, 64M and 256M
    parameters, dense table training (AdamW reads and writes every row, every step) against sparse
    (the looked-up rows only). The two paths of one size take turns step by step in one process;
    sizes run one after another, so that only two models are in memory at a time."""
    base = preset_model("cpu", engram="on")
    for rows in (4099, 65536, 524288, 2097152):  # 8 heads x 16 dims x rows: 0.5M, 8.4M, 67M, 268M
        models = {}
        for path in ("dense", "sparse"):
            torch.manual_seed(0)
            cfg = replace(base, engram=replace(base.engram, engram_rows_per_head=rows, engram_sparse=path == "sparse"))
            models[path] = GPT(cfg).to(device)
        times = interleaved_step_times(models, steps, batch_size, base.block_size, base.vocab_size, device)
        for path in models:
            emit(bench="engram_scaling", path=path, table_params=table_params(models[path].cfg.engram),
                 rows_per_head=rows, kernels="triton" if kernels.use_triton(device) else "torch", device=device,
                 batch=batch_size, block=base.block_size, step_ms=round(1000 * statistics.median(times[path]), 1))
        del models, times
        gc.collect()


def bench_mhc(steps=10, batch_size=16, device="cpu"):
    """mHC's price: step time of the CPU preset model (MLA + MoE + Engram) on 4 residual streams against 1,
    eager and under torch.compile, the four taking turns step by step in one process. Compilation happens
    in the untimed warmup steps."""
    contenders = {}  # {(hc_mult, mode): model}
    for mode in ("eager", "compiled"):
        for n in (1, 4):
            torch.manual_seed(0)
            model = GPT(preset_model("cpu", engram="on", hc_mult=n)).to(device)
            contenders[n, mode] = torch.compile(model) if mode == "compiled" else model
    cfg = contenders[1, "eager"].cfg
    times = interleaved_step_times(contenders, steps, batch_size, cfg.block_size, cfg.vocab_size, device)
    medians = {k: statistics.median(v) for k, v in times.items()}
    for (n, mode), model in contenders.items():
        counts = model.param_counts()
        emit(bench="mhc_step_time", hc_mult=n, mode=mode, device=device, batch=batch_size,
             block=cfg.block_size, params_total=counts["total"], params_active=counts["active"],
             step_ms_median=round(1000 * medians[n, mode], 1),
             tok_per_s=round(batch_size * cfg.block_size / medians[n, mode]),
             vs_one_stream=round(medians[n, mode] / medians[1, mode], 3))


# ----------------------------------------------------------------------------- Engram tables beyond one device

SHARD_SIZES = (2**16, 2**18, 2**20, 2**22)  # rows per head: 8 heads x 16 numbers, 8.4M to 537M parameters


def bench_engram_memory(steps=5, device="cpu"):
    """The system half of the Engram paper on this machine: training steps with replicated and sharded tables
    on 2 gloo processes (shard_worker), then decoding with resident, host and disk tables (bench_offload)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(shard_worker, args=(2, port, steps), nprocs=2, join=True)
    bench_offload(device=device)


def shard_worker(rank, world, port, steps, batch_size=8):
    """One of 2 ranks (one thread each): for each table size, the CPU preset model with replicated tables
    (every rank the whole table, gradients all-gathered: train.py's default under torchrun) and with sharded
    ones (--engram_shard), taking turns step by step on the same batches; per-rank table and Adam bytes.
    Where the two would not fit in memory together, they run one after the other (interleaved: false)."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    base = preset_model("cpu", engram="on")
    for rows in SHARD_SIZES:
        cfg = replace(base, engram=replace(base.engram, engram_rows_per_head=rows))
        whole = table_params(cfg.engram) * 4 * 3  # fp32 rows and Adam's two moments
        together = world * whole * (1 + 1 / world) < 0.6 * memory_available()
        phases = [("replicated", "sharded")] if together else [("replicated",), ("sharded",)]
        times, held = {}, {}
        for phase in phases:
            models = {}
            for name in phase:
                torch.manual_seed(0)
                model = GPT(cfg)
                models[name] = (model, memory.Tables(model, "cpu", shards=world if name == "sharded" else 1))
            times.update(distributed_step_times(models, steps, batch_size, cfg, rank, world))
            for name, (model, optimizers) in models.items():
                held[name] = memory.table_bytes(model, optimizers)
            del models
            gc.collect()
        per_rank = [None] * world
        torch.distributed.all_gather_object(per_rank, held)
        if rank == 0:
            medians = {k: statistics.median(v) for k, v in times.items()}
            for name in ("replicated", "sharded"):
                emit(bench="engram_shard", tables=name, ranks=world, rows_per_head=rows,
                     table_params=table_params(cfg.engram), interleaved=together, batch_per_rank=batch_size,
                     block=cfg.block_size, step_ms=round(1000 * medians[name], 1),
                     vs_replicated=round(medians[name] / medians["replicated"], 3),
                     table_bytes_per_rank=[r[name]["table"] for r in per_rank],
                     optimizer_bytes_per_rank=[r[name]["optimizer"] for r in per_rank],
                     fraction_of_whole=round(per_rank[0][name]["table"] / (table_params(cfg.engram) * 4), 4))
    torch.distributed.destroy_process_group()


def distributed_step_times(models, steps, batch_size, cfg, rank, world, warmup=2):
    """{name: [seconds per step]} as train.py takes a DDP step: forward, backward, the table gradients
    (all-gathered, or exchanged inside the sharded lookup), clipping by the global norm, the optimizers.
    Replaces each model in models by (model, its optimizers)."""
    contenders = {}
    for name, (model, tables) in models.items():
        optimizers = model.configure_optimizers(1e-3, 0.1, (0.9, 0.95))
        contenders[name] = (wrap_ddp(model, "cpu", skip=memory.sparse_param_names(model)), optimizers, tables)
        models[name] = (model, optimizers)
    times = {k: [] for k in contenders}
    gen = torch.Generator().manual_seed(rank)
    for step in range(steps + warmup):
        batch = SameBatch(torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size + 1), generator=gen))
        for name, (ddp, optimizers, tables) in contenders.items():
            torch.distributed.barrier()  # both ranks start the step together: the time is the slower rank's
            t0 = time.perf_counter()
            timed_step(ddp, batch, optimizers, tables)
            torch.distributed.barrier()
            if step >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def memory_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def bench_offload(rows=2**20, new_tokens=96, rounds=5, device="cpu", preset="cpu", **overrides):
    """Decoding tokens/s of one preset model (the CPU preset's by default; 2^20 rows per head: 537 MB of table)
    with its tables resident, in host memory ('host') and memory-mapped from a file ('disk', with the file's
    pages in the page cache, and dropped from it before each run: 'disk-cold'); and how much of the
    row-gathering time the prefetch thread hid behind the blocks in front of the Engram layer. The contenders
    run one after another, resident first, each built just before its runs (round 0 warms up, and reads the
    file into the page cache) and freed after, and each prints its line as soon as it is done: a run stopped
    by a time limit (.ci/gpu's) still reports the contenders before it. overrides: more train.py flags for
    the model (.ci/gpu's CPU mode makes it smaller)."""
    torch.manual_seed(0)
    cfg = preset_model(preset, engram="on", engram_rows_per_head=rows, **overrides)
    resident = GPT(cfg).eval()
    # on the CPU: .to(device) below gives the resident model new tensors, and these stay
    tables = {n: p.detach() for n, p in resident.named_parameters() if n.endswith(".engram.table.weight")}
    state = {k: v for k, v in resident.state_dict().items() if k not in tables}
    table_mb = round(sum(t.numel() for t in tables.values()) * 4 / 1e6)
    prompt = torch.randint(0, cfg.vocab_size, (1, 16), device=device)  # 16 + new_tokens within block_size: no window slides
    folder = tempfile.mkdtemp(prefix="bench-engram-")
    files = baseline = tokens = None
    try:
        for name in ("resident", "host", "disk", "disk-cold"):
            if name == "resident":
                model, resident = resident.to(device), None
            else:
                if files is None:  # the table file, once, for both disk contenders
                    memory.write_table_file(folder, tables)
                    files = memory.open_table_file(folder, tables)
                model = GPT(cfg, table_device="meta")
                model.load_state_dict(state, strict=False)
                memory.offload_tables(model, name.split("-")[0], device, tables if name == "host" else files)  # pinned on a GPU
                model = model.to(device).eval()
            times = []
            for r in range(rounds + 1):  # round 0 warms up
                if name == "disk-cold":  # the file's pages out of the page cache: every row read from the disk
                    fd = os.open(os.path.join(folder, memory.TABLE_FILE), os.O_RDONLY)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)
                for t in memory.offloaded_tables(model):
                    t.fetch_s = t.wait_s = 0.0
                t0 = time.perf_counter()
                list(model.generate(prompt, new_tokens, temperature=0))  # each token's .item() waits for the device
                if r:
                    times.append(time.perf_counter() - t0)
            fetched = memory.prefetch_stats(model)  # the last run's
            seconds = statistics.median(times)
            baseline = baseline or seconds
            ids = torch.cat(list(model.generate(prompt, 8, temperature=0)), 1)
            tokens = ids if tokens is None else tokens
            emit(bench="engram_offload_decode", tables=name, rows_per_head=rows, table_mb=table_mb,
                 new_tokens=new_tokens, device=device, tok_per_s=round(new_tokens / seconds, 1),
                 vs_resident=round(baseline / seconds, 3),
                 **({"gather_ms_per_token": round(1000 * fetched["fetch_s"] / new_tokens, 3),
                     "wait_ms_per_token": round(1000 * fetched["wait_s"] / new_tokens, 3),
                     "prefetch_hidden": round(fetched["hidden"], 3)} if fetched["hidden"] is not None else {}),
                 same_tokens=torch.equal(ids, tokens))
            del model
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    finally:
        files = None
        for name in memory.TABLE_FILE, memory.MANIFEST:
            if os.path.exists(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
        os.rmdir(folder)


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
    """One Engram layer's lookup (orders 2 and 3): returns shape, call(), bytes moved."""
    cfg = EngramConfig(engram_layers=(0,), ngram_orders=(2, 3), engram_heads_per_order=heads_per_order,
                       engram_dim_per_order=heads_per_order * head_dim, engram_rows_per_head=rows_per_head)
    compression = TokenizerCompression(cfg, vocab_size=32000).to(device)
    context = compression(torch.randint(0, 32000, (batch, seq), device=device))  # (B, P+T) canonical ids
    primes = torch.tensor(head_table_sizes(cfg)[0], device=device)
    table = torch.randn(int(primes.sum()), head_dim, device=device, dtype=dtype)
    args = (context, hash_multipliers(cfg, compression.n_canonical)[0].to(device), primes, primes.cumsum(0) - primes,
            cfg.ngram_orders, heads_per_order, table)
    n_heads = 2 * heads_per_order
    shape = {"tokens": batch * seq, "heads": n_heads, "head_dim": head_dim, "table_rows": table.shape[0]}
    return shape, lambda: engram.lookup(*args), \
        kernels.engram_lookup_bytes(batch * seq, n_heads, head_dim, table.element_size()), None


def moe_case(n_tokens, n_experts, top_k, dim, inter_dim, device, dtype):
    """All routed experts' SwiGLU over expert-sorted rows (random top-k routing): FLOPs-bound."""
    expert_ids = torch.rand(n_tokens, n_experts, device=device).topk(top_k, dim=-1).indices.flatten()
    counts = torch.bincount(expert_ids, minlength=n_experts)
    x = torch.randn(n_tokens * top_k, dim, device=device, dtype=dtype)
    w1, w3 = (torch.randn(n_experts, inter_dim, dim, device=device, dtype=dtype) / dim ** 0.5 for _ in range(2))
    w2 = torch.randn(n_experts, dim, inter_dim, device=device, dtype=dtype) / inter_dim ** 0.5
    shape = {"tokens": n_tokens, "experts": n_experts, "top_k": top_k, "dim": dim, "inter_dim": inter_dim}
    flops = kernels.moe_grouped_swiglu_flops(n_tokens * top_k, dim, inter_dim)
    return shape, lambda: moe.run_experts(x, counts, w1, w3, w2), None, flops


def mla_case(batch, cache_len, n_heads, device, dtype, kv_lora_rank=512, rope_dim=64):
    """One decode step of absorbed MLA over a latent cache (DeepSeek-V3 dims): bandwidth-bound."""
    q = torch.randn(batch, n_heads, kv_lora_rank, device=device, dtype=dtype)
    q_rope = torch.randn(batch, n_heads, rope_dim, device=device, dtype=dtype)
    kv = torch.randn(batch, cache_len, kv_lora_rank, device=device, dtype=dtype)
    k_rope = torch.randn(batch, cache_len, rope_dim, device=device, dtype=dtype)
    scale = (128 + rope_dim) ** -0.5
    shape = {"batch": batch, "cache_len": cache_len, "heads": n_heads, "kv_lora_rank": kv_lora_rank}
    return shape, lambda: mla.latent_attention(q[:, None], q_rope[:, None], kv, k_rope, scale, cache_len - 1), \
        kernels.mla_decode_bytes(batch, n_heads, cache_len, kv_lora_rank, rope_dim, kv.element_size()), None


def bench_kernels():
    """Each kernel against its PyTorch reference (the model files' op, --kernels=torch and triton). On a CPU only the references run, on small shapes,
    so that a reader without a GPU still gets output (and unless TRITON_INTERPRET=1 is set, which
    runs the kernels in the interpreter: a correctness path whose timings mean nothing)."""
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    run_triton = kernels.HAVE_TRITON and (gpu or kernels.INTERPRET)
    label = torch.cuda.get_device_name() if gpu else (
        "cpu: Triton interpreter, timings meaningless" if run_triton else "cpu: PyTorch reference only (no GPU)")
    if gpu:
        dtype = gpu_dtype()
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
                row[f"{impl}_ms"] = round(time_ms(lambda: in_mode(impl, call), device), 4)
            if run_triton:  # recorded, not asserted: one miss must not cost the rest of a GPU run
                diff = in_mode("triton", call).float() - in_mode("torch", call).float()
                row["max_abs_err"] = float(diff.abs().max())
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


def gpu_dtype():
    """What train.py's --dtype=auto picks on this GPU: bf16 from compute capability 8.0, else fp16."""
    return getattr(torch, cli.resolve_dtype("auto", cli.describe_device("cuda")))


def in_mode(mode, fn):
    """fn() with kernels.py's switch set to mode ('torch' or 'triton'), then set back."""
    previous, kernels.mode = kernels.mode, mode
    try:
        return fn()
    finally:
        kernels.mode = previous


def bench_end_to_end(device, steps=10):
    """GPU preset model: training tokens/s and sampling tokens/s with --kernels=torch vs triton
    (two copies of one model, each trained with its own mode)."""
    cfg = replace(train_config(["--preset=gpu", f"--device={device}"]).model, vocab_size=7000)
    torch.manual_seed(0)
    models = {"torch": GPT(cfg).to(device)}
    models["triton"] = GPT(cfg).to(device)
    models["triton"].load_state_dict(models["torch"].state_dict())
    opts = {k: m.configure_optimizers(1e-4, 0.1, (0.9, 0.95), "cuda") for k, m in models.items()}
    B, T = 32, cfg.block_size
    times = {k: [] for k in models}
    for step in range(steps + 2):
        x = torch.randint(0, 7000, (B, T + 1), device=device)
        for mode, model in models.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=gpu_dtype()):
                _, loss = in_mode(mode, lambda: model(x[:, :-1], x[:, 1:]))
            in_mode(mode, loss.backward)
            for opt in opts[mode]:
                opt.step()
                opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if step >= 2:
                times[mode].append(time.perf_counter() - t0)
    for mode in models:
        emit(bench="end_to_end_train", kernels=mode, batch=B, block=T,
             tok_per_s=round(B * T / statistics.median(times[mode])))
    for mode, model in models.items():
        model.eval()
        prompt = torch.randint(0, 7000, (32, 16), device=device)
        with torch.autocast("cuda", dtype=gpu_dtype()):
            in_mode(mode, lambda: list(model.generate(prompt, 8, temperature=0)))  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            in_mode(mode, lambda: list(model.generate(prompt, 256, temperature=0)))
            torch.cuda.synchronize()
        emit(bench="end_to_end_sample", kernels=mode, batch=32, new_tokens=256,
             tok_per_s=round(32 * 256 / (time.perf_counter() - t0)))


def main(argv=None):
    try:
        cfg = cli.parse(BenchConfig(), sys.argv[1:] if argv is None else argv, __doc__)
        # a CUDA GPU or the CPU (not MPS: its sparse tables and timers differ, see train.py)
        device, _ = cli.setup_device("cuda" if torch.cuda.is_available() else "cpu", "auto")
    except cli.ConfigError as e:
        cli.fail(e)
    if cfg.kernels:
        bench_kernels()
    elif cfg.engram_scaling:
        bench_engram_scaling(steps=cfg.steps or 8, device=device)
    elif cfg.mhc:
        bench_mhc(steps=cfg.steps or 10, device=device)
    elif cfg.engram_memory:
        bench_engram_memory(steps=cfg.steps or 5, device=device)
    else:
        bench_kv_cache()
        bench_train_speed(steps=cfg.steps or 20, device=device)


if __name__ == "__main__":
    main()
