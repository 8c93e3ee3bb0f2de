"""Train a nano-engram GPT on TinyStories.

    python train.py                                  # preset chosen by device (cpu or gpu)
    python train.py --source=../shared/tinystories   # offline: local TinyStories text
    python train.py --preset=cpu --engram=off --max_iters=500
    torchrun --nproc_per_node=2 train.py             # DDP (nccl on GPU, gloo on CPU)

The run directory gets config.json, log.jsonl (one line per evaluation), loss.png and ckpt.pt.
--resume continues a run exactly where it stopped. Ctrl-C or SIGTERM lets the current step
finish, then evaluates, saves and exits; a second one stops at once.
"""
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
import harness
import kernels
import memory
from data import DataConfig, DataError, Tokenizer, batch_at, get_batch, load_or_prepare, load_tokens, val_starts
from engram import head_table_sizes, table_params
from model import GPT, GPTConfig


@dataclass
class TrainConfig:
    out_dir: str = "out"              # run folder: config.json, log.jsonl, loss.png, ckpt.pt
    preset: str = ""                  # 'cpu' | 'gpu'; '' = chosen by device
    device: str = "auto"              # 'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps'
    dtype: str = "auto"               # 'auto' (bf16 autocast on CUDA sm80+, fp16 + loss scaling on older GPUs, fp32 on CPU/MPS) | 'bfloat16' | 'float16' | 'float32'
    kernels: str = "auto"             # 'auto' | 'triton' | 'torch': Triton kernels (kernels.py) where the GPU suits them
    compile: bool = False             # torch.compile the model
    resume: bool = False              # continue out_dir/ckpt.pt where it stopped
    overwrite: bool = False           # start afresh in an out_dir that holds a run, replacing it
    seed: int = 1337                  # initial weights and batch order
    max_iters: int = 2000             # optimizer steps in all
    eval_interval: int = 200          # steps between evaluations (each logs, plots and saves)
    eval_iters: int = 20              # validation batches per evaluation (fixed windows)
    batch_size: int = 32              # sequences per micro-batch and process
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    learning_rate: float = 3e-3       # peak learning rate, after warmup; 0 (with --min_lr=0) = frozen: the steps run, no weight moves
    min_lr: float = 3e-4              # where the cosine decay ends
    warmup_iters: int = 100           # steps of linear warmup
    lr_decay_iters: int = 0           # steps of cosine decay; 0 = max_iters
    weight_decay: float = 0.1         # AdamW weight decay of matrices
    beta1: float = 0.9                # Adam beta1
    beta2: float = 0.95               # Adam beta2
    grad_clip: float = 1.0            # clip the gradient norm at this; 0 = off
    engram_shard: bool = False        # under torchrun: each rank keeps 1/world of every Engram table's rows and their Adam state (memory.py)
    engram_offload: str = ""          # 'host': Engram's tables stay in host memory, each batch's rows gathered a step ahead; '' = on the device
    data: DataConfig = field(default_factory=DataConfig)
    model: GPTConfig = field(default_factory=GPTConfig)

    def __post_init__(self):
        # --learning_rate=0 --min_lr=0 (or one group's, through --engram_lr_mult=0) is allowed and means frozen:
        # the optimizers step but move nothing (GPT.configure_optimizers gives SparseAdam a placeholder lr)
        cli.check_numbers(self, seeds=("seed",))
        for name in ("max_iters", "eval_interval", "eval_iters", "batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)}: must be at least 1")
        for name in ("learning_rate", "min_lr", "warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:  # NaN fails too
                raise ValueError(f"--{name}={getattr(self, name)}: must be >= 0")
        if self.min_lr > self.learning_rate:
            raise ValueError(f"--min_lr={self.min_lr} is above --learning_rate={self.learning_rate}: the decay would "
                             "raise the rate; give --min_lr <= --learning_rate (0 and 0 freeze the weights)")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"--beta1={self.beta1}, --beta2={self.beta2}: each must be in [0, 1)")
        if self.preset not in ("", *PRESETS):
            raise ValueError(f"--preset={self.preset}: expected one of {', '.join(PRESETS)}")
        if self.dtype not in cli.DTYPES:
            raise ValueError(f"--dtype={self.dtype}: expected one of {', '.join(cli.DTYPES)}")
        if self.kernels not in kernels.MODES:
            raise ValueError(f"--kernels={self.kernels}: expected one of {', '.join(kernels.MODES)}")
        if self.engram_offload not in ("", "host"):
            raise ValueError(f"--engram_offload={self.engram_offload}: expected host (or nothing); training reads "
                             "no table from disk (sample.py --engram_offload=disk does)")
        if self.engram_offload and self.engram_shard:
            raise ValueError("--engram_offload=host and --engram_shard=true: choose one (host tables train on one "
                             "process; sharded tables split them over torchrun's ranks)")


# Presets are plain overrides, applied before the command line's.
PRESETS = {
    # About 6 minutes on 2 CPU cores: ~0.8M tokens, 1.6 epochs of the 0.5M-token excerpt in ../shared
    # (past ~2 epochs the validation loss turns up). Short runs need the router bias to adapt faster than
    # DeepSeek-V3's 1e-3 per step, hence bias_update_speed. The Engram table's rows follow the train
    # split (rows_for_split) unless --engram_rows_per_head is given.
    "cpu": dict(max_iters=400, eval_interval=50, eval_iters=10, batch_size=16, block_size=128,
                n_layer=6, n_head=8, n_embd=256, learning_rate=3e-3, min_lr=3e-4, warmup_iters=40,
                bias_update_speed=1e-2),
    # A single modern GPU: a ~50M-parameter model on ~330M tokens of the whole train split.
    "gpu": dict(max_iters=5000, eval_interval=250, eval_iters=40, batch_size=128, block_size=512,
                n_layer=8, n_head=8, n_embd=512, learning_rate=1.5e-3, min_lr=1.5e-4, warmup_iters=200,
                kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                moe_inter_dim=256, n_routed_experts=16, n_activated_experts=2, bias_update_speed=1e-3,
                engram_rows_per_head=65537, engram_dim_per_order=256, max_train_mb=0.0),
}


# The cpu preset's Engram rows per head, by the prepared train split's size (README, "The CPU preset"):
# 2^16, the largest table whose step stayed within 1.1x of the smallest's, was the best size on 1.6M
# tokens (compare.py --memory_sweep); on the 0.5M-token offline excerpt, a 2^16 table is spread too thin
# (each row is looked up too rarely in 400 steps) and 4,099 rows gave 3.345 where 2^16 gave 3.404.
SMALL_SPLIT_TOKENS, SMALL_SPLIT_ROWS, ROWS = 1_000_000, 4099, 65536


def rows_for_split(train_tokens: int) -> int:
    return SMALL_SPLIT_ROWS if train_tokens < SMALL_SPLIT_TOKENS else ROWS


def main(argv=None):
    # until the loop takes over the signals (harness.StopRequest), SIGTERM stops start-up as Ctrl-C does
    sigterm = signal.signal(signal.SIGTERM, harness.interrupt)
    try:
        train(build_config(sys.argv[1:] if argv is None else argv))
    except (cli.ConfigError, DataError) as e:
        cli.fail(e, 2)
    except KeyboardInterrupt:  # Ctrl-C at start-up, or a second one in the loop: the last checkpoint stays as it was
        cli.fail("interrupted; the last checkpoint is kept", 130)
    finally:
        signal.signal(signal.SIGTERM, sigterm)


def train(cfg: TrainConfig):
    """A run in cfg.out_dir (run_training), whose lock (harness.check_out_dir) goes however it ends."""
    try:
        return run_training(cfg)
    finally:
        harness.release_lock(cfg.out_dir)


def run_training(cfg: TrainConfig):
    """Everything a run does, in order: processes, data, model and optimizers, then the loop."""
    ddp, rank, world, cfg.device = harness.init_distributed(cfg.device)
    master, device_type = rank == 0, torch.device(cfg.device).type  # 'cuda', 'cpu' or 'mps'
    ckpt_path, log_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "log.jsonl")
    ckpt = harness.load_checkpoint(ckpt_path) if cfg.resume else None
    if ckpt is not None and finished(ckpt, cfg, master):
        return
    shard = check_table_placement(cfg, ddp, world, master)
    check_tables_fit(cfg.model.engram, "cpu" if cfg.engram_offload else cfg.device, world if shard else 1)
    harness.on_first_rank(lambda: harness.check_out_dir(cfg), ddp)  # checks, and takes its lock; changes nothing
    if master and (note := sinkhorn_note(cfg)):
        print(note, file=sys.stderr)

    # data: prepared once per machine, the token files checked against meta.json, then memory-mapped
    meta = harness.on_first_rank(lambda: load_or_prepare(cfg.data), ddp, per_machine=True) \
        or load_or_prepare(cfg.data)  # the other ranks read (and check) what the first one wrote
    tok = Tokenizer.from_meta(meta)
    train_tokens, val_tokens = (load_tokens(cfg.data.data_dir, split) for split in ("train", "val"))
    cfg.model = dataclasses.replace(cfg.model, vocab_size=tok.vocab_size)
    check_step_fits(cfg, world if shard else 1)
    block_size = cfg.model.block_size
    # the same validation windows in every run; under DDP each rank scores its part of each batch
    starts = val_starts(len(val_tokens), cfg.eval_iters * cfg.batch_size * world, block_size)

    # model and optimizers: AdamW, plus lazy Adam for sparse Engram tables
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = raw_model = GPT(cfg.model, token_bytes=tok.token_bytes())
    if cfg.engram_offload:  # before .to(device): the tables stay in host memory (memory.OffloadedTable)
        raw_model.offload_tables("host", cfg.device)
    if shard:  # every rank drew the whole table (the same initial weights as one process), and keeps its rows
        raw_model.shard_tables(rank, world)
    raw_model.to(cfg.device)
    host_tables = memory.offloaded_tables(raw_model)
    sharded = [t.weight for t in memory.sharded_params(raw_model).values()]
    optimizers = raw_model.configure_optimizers(cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                                device_type)
    if ckpt is not None and shard:  # checkpoints hold whole tables: cut out this rank's rows and moments
        ckpt["model"], ckpt["optimizers"] = memory.shard_state(raw_model, optimizers, ckpt["model"], ckpt["optimizers"])
    rng = np.random.default_rng(cfg.seed)  # batch order: each rank draws the global batch, takes its part
    # precision by hardware (cli.resolve_dtype): autocast in bf16 or fp16, or plain fp32. fp16's narrow range
    # needs loss scaling: the scaler multiplies the loss before backward and divides the gradients after.
    dtype = cli.resolve_dtype(cfg.dtype, cli.describe_device(cfg.device))
    autocast = torch.autocast(device_type, dtype=getattr(torch, dtype)) if dtype != "float32" else nullcontext()
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")  # disabled: every call a no-op
    it, tokens_seen, elapsed = harness.restore(ckpt, raw_model, optimizers, rng, scaler) if ckpt else (0, 0, 0.0)
    if master:  # the run has started: only now is an old run (--overwrite=true) moved aside
        harness.begin_run(cfg)
        announce(cfg, raw_model, tok, meta, world, it, dtype)
        harness.trim_log(log_path, it)
    if cfg.compile:
        model = torch.compile(model)
    if ddp:  # DDP averages the dense gradients; the sparse tables' rows are averaged by the model itself
        model = harness.wrap_ddp(model, cfg.device, skip=raw_model.sparse_param_names())
    tokens_per_iter = cfg.batch_size * block_size * cfg.gradient_accumulation_steps * world

    byte_lengths = token_byte_lengths(tok, cfg.device)  # for bits per byte
    val_loss, val_bpb = evaluate(raw_model, val_tokens, starts, cfg, autocast, rank, world, byte_lengths) \
        if it == 0 else (None, None)
    if it == 0 and master:  # the untrained model's loss anchors every curve
        harness.append_log(log_path, {"iter": 0, "tokens": 0, "train_loss_mean": None, "train_loss_last": None,
                                      "val_loss": val_loss, "val_bpb": val_bpb, "lr": 0.0, "tok_per_s": 0.0,
                                      "elapsed_s": 0.0, **hc_record(raw_model)})
    stop, status, overflows_in_a_row = harness.StopRequest(), 0, 0
    window_losses, load_stats, window_skips, window_t0, window_tokens = [], [], 0, time.time(), 0
    # a progress bar only on a terminal (disable=None): in a pipe or a log file it is noise
    bar = tqdm(total=cfg.max_iters, initial=it, disable=None if master else True, desc="train",
               dynamic_ncols=True)
    t_last = time.time()
    try:
        while it < cfg.max_iters:
            lr = lr_at(it, cfg)
            for g in (g for opt in optimizers for g in opt.param_groups):
                g["lr"] = lr * g["lr_mult"]
            step_losses = []
            for micro in range(cfg.gradient_accumulation_steps):
                x, y = get_batch(train_tokens, cfg.batch_size, block_size, rng, cfg.device, rank, world)
                last_micro = micro == cfg.gradient_accumulation_steps - 1
                with (model.no_sync() if ddp and not last_micro else nullcontext()), autocast:
                    _, loss = model(x, y)
                if host_tables:  # the next batch (drawn from a copy of rng: the same one) is gathered meanwhile
                    raw_model.prefetch(get_batch(train_tokens, cfg.batch_size, block_size, copy.deepcopy(rng),
                                                 cfg.device, rank, world)[0])
                scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
                step_losses.append(loss.item())
            if ddp:
                raw_model.average_sparse_grads()
            for opt in optimizers:
                scaler.unscale_(opt)  # fp16: the true gradients again, before they are clipped
            if sharded and scaler.is_enabled():
                memory.agree_found_inf(scaler, optimizers)
            grad_norm = clip_grad_norm(raw_model.parameters(), cfg.grad_clip, sharded)
            # every rank learns whether any rank saw a non-finite loss or gradient, or was asked to stop
            bad_loss, bad_grad, stopping = harness.agree(ddp, cfg.device, not all(map(math.isfinite, step_losses)),
                                                         not math.isfinite(grad_norm), stop.signal is not None)
            # fp16: a gradient that overflowed means the loss scale is too high; the step is skipped by every
            # optimizer and the scale halved (scaler.update). A real divergence overflows at any scale.
            overflow = bad_grad and scaler.is_enabled() and not bad_loss
            overflows_in_a_row = overflows_in_a_row + 1 if overflow else 0
            if bad_loss or (bad_grad and not overflow) or overflows_in_a_row > MAX_OVERFLOWS_IN_A_ROW:
                if master:
                    what = (f"the fp16 gradient overflowed {overflows_in_a_row} steps in a row (loss scale now "
                            f"{scaler.get_scale():.1e})" if overflow else "loss or gradient became non-finite")
                    bar.write(f"error: {what} at iter {it} (last loss {step_losses[-1]}); stopping without saving. "
                              f"The last good checkpoint, if any, is {ckpt_path}. Try a lower --learning_rate"
                              + (" or --dtype=float32." if scaler.is_enabled() else "."), file=sys.stderr)
                status = 1
                break
            for opt in optimizers:
                if not overflow:
                    scaler.step(opt)  # opt.step(), with the loss scale's bookkeeping under fp16
            for table in host_tables:  # rows SparseAdam just changed: a prefetch that read them reads them again
                table.mark_updated()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            scaler.update()
            window_skips += overflow
            moe_load = raw_model.update_router_biases()  # aux-loss-free balancing (DeepSeek-V3 §2.1.2)
            if moe_load:
                load_stats.append({k: v["max_over_mean"] for k, v in moe_load.items()})
            window_losses += step_losses
            it, tokens_seen, window_tokens = it + 1, tokens_seen + tokens_per_iter, window_tokens + tokens_per_iter
            now = time.time()
            elapsed, t_last = elapsed + now - t_last, now
            tok_per_s = window_tokens / max(now - window_t0, 1e-9)
            bar.update(1)
            bar.set_postfix(step_loss=f"{step_losses[-1]:.3f}", lr=f"{lr:.1e}", tok_s=f"{tok_per_s:,.0f}")

            if it % cfg.eval_interval == 0 or it == cfg.max_iters or stopping:
                val_loss, val_bpb = evaluate(raw_model, val_tokens, starts, cfg, autocast, rank, world, byte_lengths)
                elapsed, t_last = elapsed + time.time() - t_last, time.time()  # evaluation is wall time too
                record = {"iter": it, "tokens": tokens_seen, "train_loss_mean": float(np.mean(window_losses)),
                          "train_loss_last": step_losses[-1], "val_loss": val_loss, "val_bpb": val_bpb, "lr": lr,
                          "tok_per_s": tok_per_s, "elapsed_s": elapsed}
                if load_stats:  # mean over the window's steps of each MoE layer's max/mean expert load
                    record["moe_max_over_mean"] = {str(k): round(float(np.mean([s[k] for s in load_stats])), 3)
                                                   for k in load_stats[0]}
                record.update(hc_record(raw_model))
                if scaler.is_enabled():  # fp16: the loss scale now, and the steps skipped since the last evaluation
                    record.update(loss_scale=scaler.get_scale(), skipped_steps=window_skips)
                record.update(table_record(raw_model, optimizers, ddp, world))
                # whole tables in every checkpoint: a sharded run's are assembled on the first rank (all ranks call)
                model_state, opt_states = memory.unshard_state(raw_model, optimizers, rank) if sharded else \
                    (raw_model.state_dict(), [o.state_dict() for o in optimizers])
                state = {"model": model_state, "optimizers": opt_states,
                         "scaler": scaler.state_dict(), "config": dataclasses.asdict(cfg), "meta": meta, "iter": it,
                         "tokens": tokens_seen, "elapsed_s": elapsed, "rng": rng.bit_generator.state,
                         "torch_rng": torch.get_rng_state()}
                harness.on_first_rank(lambda: bar.write(harness.save_evaluation(cfg.out_dir, record, state)), ddp)
                window_losses, load_stats, window_skips, window_t0, window_tokens = [], [], 0, time.time(), 0
            if stopping:
                if master:
                    bar.write(f"stopped by signal {stop.signal}: saved {ckpt_path} at iter {it}; "
                              "continue with --resume")
                status = 128 + stop.signal
                break
    finally:
        bar.close()
        stop.restore()
    if ddp:  # a sharded table differs by rank by design; every other parameter must agree
        model = None  # DDP's reducer goes before the process group it uses: freed after it, it can hang at exit
        harness.finish_distributed(raw_model, check_agreement=status == 0, skip=set(memory.sharded_params(raw_model)))
    if status:
        sys.exit(status)
    if master and val_loss is not None:
        print(f"done: val loss {val_loss:.4f} ({val_bpb:.4f} bits per byte) after {it:,} steps, {tokens_seen:,} tokens, {elapsed / 60:.1f} min "
              f"({tokens_seen / elapsed:,.0f} tok/s, evaluations included); checkpoint {ckpt_path}, log {log_path}, "
              f"plot {os.path.join(cfg.out_dir, 'loss.png')}")
    return raw_model


MAX_OVERFLOWS_IN_A_ROW = 20  # fp16: from a scale of 2^16, 20 halvings reach 2^-4; overflowing still is divergence


def lr_at(it, cfg):
    """Linear warmup, then cosine decay to min_lr (nanoGPT's schedule)."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def evaluate(model, val_tokens, starts, cfg, autocast, rank=0, world=1, byte_lengths=None):
    """(mean loss, bits per byte) over the fixed validation windows (the same for every run): batches of
    batch_size * world windows, of which each rank scores its part, then over the ranks. The loss is the
    training objective (the MoE balance term included, where on); bits per byte is the cross-entropy alone,
    summed in bits over the scored targets and divided by their UTF-8 bytes (byte_lengths, per token id),
    which does not depend on the vocabulary. Targets of 0 bytes (<|endoftext|>, and <unk>, whose bytes are
    not kept) are left out of both sums, as nanochat does for special tokens."""
    model.eval()
    losses, bits, n_bytes, B = [], 0.0, 0, cfg.batch_size
    for i in range(0, len(starts), B * world):
        x, y = batch_at(val_tokens, starts[i + rank * B:i + (rank + 1) * B], cfg.model.block_size, cfg.device)
        with autocast:
            logits, loss = model(x, y)
        losses.append(loss.item())
        if byte_lengths is not None:
            nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")  # (B*T,)
            lengths = byte_lengths[y.flatten()]
            bits += float((nats * (lengths > 0)).sum()) / math.log(2)
            n_bytes += int(lengths.sum())
    model.train()
    loss = harness.mean_over_ranks(float(np.mean(losses)), world, cfg.device)
    if byte_lengths is None:
        return loss, None
    bits, n_bytes = (world * harness.mean_over_ranks(v, world, cfg.device) for v in (bits, float(n_bytes)))
    return loss, bits / max(n_bytes, 1.0)


def token_byte_lengths(tok, device) -> torch.Tensor:
    """(vocab,) the UTF-8 bytes of each token id, 0 for <|endoftext|> and <unk> (bits per byte leaves them out)."""
    lengths = torch.tensor([len(b) for b in tok.token_bytes()], device=device)
    for special in (tok.eot_id, tok.unk_id):
        if special is not None:
            lengths[special] = 0
    return lengths


def hc_record(model) -> dict:
    """mHC's log fields, from the last batch evaluated: the composite H_res's Amax gain (GPT.hc_amax_gain)
    and how far apart the streams are at each block's output (GPT.hc_stream_diversity); {} with one stream."""
    gain = model.hc_amax_gain()
    return {} if gain is None else {"hc_amax_gain": gain, "hc_stream_diversity": model.hc_stream_diversity()}


def clip_grad_norm(params, max_norm, sharded=()):
    """torch.nn.utils.clip_grad_norm_, which cannot read a sparse gradient: a sparse table gradient is
    coalesced (a row looked up twice is one row, its two gradients summed) and its values stand in.
    sharded: parameters split over the ranks (memory.ShardedTable), whose squared norms are summed over
    all ranks, so that every rank clips by the norm of the whole gradient. Returns the norm before
    clipping; max_norm=0 only measures it (for the non-finite check)."""
    grads, shard_grads, shard_ids = [], [], {id(p) for p in sharded}
    for p in (p for p in params if p.grad is not None):
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
        (shard_grads if id(p) in shard_ids else grads).append(p.grad._values() if p.grad.is_sparse else p.grad)
    total = torch.nn.utils.get_total_norm(grads)
    if shard_ids:
        squares = torch.nn.utils.get_total_norm(shard_grads).to(total) ** 2
        torch.distributed.all_reduce(squares)
        total = (total ** 2 + squares).sqrt()
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads + shard_grads:
            g.mul_(scale)
    return float(total)


def table_record(model, optimizers, ddp, world) -> dict:
    """log.jsonl's record of the Engram tables' memory under torchrun: each rank's table and optimizer-state
    bytes (memory.table_bytes), which sharding makes 1/world of the whole."""
    if not ddp or not model.cfg.engram.engram_layers:
        return {}
    per_rank = [None] * world
    torch.distributed.all_gather_object(per_rank, memory.table_bytes(model, optimizers))
    return {"engram_bytes_per_rank": per_rank}


# ----------------------------------------------------------------------------- configuration

def build_config(argv) -> TrainConfig:
    """Defaults <- preset (chosen by device unless given) <- command line. With --resume: the
    checkpoint's config <- the flags given now, which may change how the run trains (max_iters,
    device, kernels, ...) but not its model, data or preset."""
    cli.exit_with_help_if_asked(argv, __doc__, TrainConfig(),
                                extra="\n  --engram=on|off: the default engram_layers, or none")
    flags = cli.parse_flags(argv, {**cli.flat_fields(TrainConfig()), "engram": str})
    engram = flags.pop("engram", "on").lower()  # --engram=off: shorthand for an empty engram_layers
    if engram not in ("on", "off"):
        raise cli.ConfigError(f"--engram={engram}: expected on or off")
    if engram == "off":
        flags["engram_layers"] = ""
    if cli.parse_value("resume", flags.get("resume", "false"), bool):
        cfg = resumed_config(flags)
    else:  # the gpu preset on an NVIDIA GPU; the cpu preset, sized for a laptop, on a CPU or an Apple GPU
        device = cli.resolve_device(flags.get("device", "auto"))
        preset = flags.get("preset") or ("gpu" if device.startswith("cuda") else "cpu")
        cfg = cli.apply(TrainConfig(), {**PRESETS.get(preset, {}), "preset": preset, **flags})
        if preset == "cpu" and "engram_rows_per_head" not in flags and cfg.model.engram.engram_layers:
            rows = rows_for_split(split_tokens(cfg.data))
            cfg.model.engram = dataclasses.replace(cfg.model.engram, engram_rows_per_head=rows)
    device, _ = cli.setup_device(cfg.device, cfg.kernels, cfg.dtype)
    return fit_to_device(dataclasses.replace(cfg, device=device))


def split_tokens(data_cfg) -> int:
    """The train split's tokens, preparing the data first if needed (train() then finds it ready). Under
    torchrun the ranks would prepare it side by side, so there it must exist already."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not os.path.isfile(os.path.join(data_cfg.data_dir, "meta.json")):
        raise cli.ConfigError(f"--preset=cpu sizes Engram's table by the train split, which {data_cfg.data_dir} does "
                              "not hold yet: run python data.py with the same data flags first, or give --engram_rows_per_head")
    return load_or_prepare(data_cfg)["train_tokens"]


def fit_to_device(cfg) -> TrainConfig:
    """What the device cannot do, worked around: MPS has no sparse tensors (PyTorch issues 87886, 129842),
    so there the Engram tables train densely, with AdamW (announce says so, and what it costs)."""
    engram = cfg.model.engram
    if cfg.device != "mps" or not (engram.engram_sparse and engram.engram_layers):
        return cfg
    if cfg.resume:
        raise cli.ConfigError(f"--resume on mps: {cfg.out_dir} trains its Engram tables sparsely, which MPS cannot; "
                              "resume it on a CPU or an NVIDIA GPU (sample.py runs it on MPS as it is)")
    dense = dataclasses.replace(engram, engram_sparse=False)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, engram=dense))


def dense_table_note(cfg) -> str:
    """The one line announce prints where fit_to_device made the tables dense: why, and the price."""
    if cfg.device != "mps" or cfg.model.engram.engram_sparse or not cfg.model.engram.engram_layers:
        return ""
    n = table_params(cfg.model.engram)
    return (f"note: MPS has no sparse tensors, so the Engram tables ({n / 1e6:.1f}M parameters) train densely: every "
            f"step writes a {4 * n / 2**20:,.0f} MB gradient and AdamW moves every row (on a CPU, bench.py "
            "--engram_scaling measured the dense step at 1.10x the sparse one with 8.4M table parameters, 4.6x at 268M)")


def resumed_config(flags) -> TrainConfig:
    """The config saved in --out_dir's checkpoint with the flags given now; a flag that would change
    the model, the data or the preset is refused (the weights were trained for them)."""
    path = os.path.join(flags.get("out_dir", TrainConfig.out_dir), "ckpt.pt")
    harness.check_unlocked(os.path.dirname(path))  # a run training there now: say so, not that its checkpoint is odd
    saved = harness.load_checkpoint(path)["config"]
    try:
        own = {k: v for k, v in saved.items() if k not in ("data", "model")}
        cfg = TrainConfig(**own, data=DataConfig(**saved["data"]), model=GPTConfig.from_dict(saved["model"]))
    except (KeyError, TypeError, ValueError) as e:
        raise cli.ConfigError(f"{path} holds a config this code cannot read ({e}); retrain it") from None
    new, fixed = cli.apply(cfg, flags), {"preset", *cli.flat_fields(cfg.model), *cli.flat_fields(cfg.data)}
    for key in fixed & set(flags):
        if cli.flat_values(new)[key] != cli.flat_values(cfg)[key]:
            raise cli.ConfigError(f"--{key}: a resumed run keeps its model, data and preset; drop the flag, or "
                                  "train a new run in another --out_dir")
    return settings_for_this_machine(new, given=flags)


def settings_for_this_machine(cfg, given) -> TrainConfig:
    """A resumed run keeps its saved --device, --dtype and --kernels where this machine has them. One it
    lacks (a GPU run resumed on a laptop: cuda, triton) and not given now falls back to auto, with a note."""
    checks = {"device": lambda c: cli.resolve_device(c.device),
              "dtype": lambda c: cli.resolve_dtype(c.dtype, cli.describe_device(cli.resolve_device(c.device))),
              "kernels": lambda c: cli.setup_device(c.device, c.kernels, c.dtype)}
    for key, check in checks.items():
        try:
            check(cfg)
        except cli.ConfigError as e:
            if key in given:
                raise
            print(f"note: resuming with --{key}=auto, as the saved setting does not suit this machine ({e})")
            cfg = dataclasses.replace(cfg, **{key: "auto"})
    return cfg


def check_tables_fit(engram_cfg, device, shards=1):
    """Engram's tables (fp32 weights, two Adam moments and, without engram_sparse, a dense gradient)
    must fit in memory, 1/shards of them per rank when sharded: fail now with the estimate, not after
    minutes of work."""
    n = (table_params(engram_cfg) if engram_cfg.engram_layers else 0) // shards
    cli.check_fits(n * 4 * (3 if engram_cfg.engram_sparse else 4), device, f"--engram_rows_per_head="
                   f"{engram_cfg.engram_rows_per_head}: {n / 1e6:,.0f}M table parameters with their Adam state"
                   + (f" on each of {shards} ranks" if shards > 1 else ""))


def step_bytes(cfg, shards=1) -> dict:
    """From the config alone, about how many bytes of the device one training step holds, by the flag that
    sizes each part: {flag: bytes}. A low estimate, so that it refuses only what surely cannot fit: fp32
    weights with their gradient and two Adam moments (16 bytes a parameter), the Engram tables (as
    check_tables_fit counts them, unless offloaded), the activations backward keeps (on a CPU or Apple GPU
    the attention's T x T scores too), and mHC's n streams and n x n maps (each Sinkhorn iteration's, kept
    for backward)."""
    m, moe = cfg.model, cfg.model.moe
    d, L, H, T, V, n = m.n_embd, m.n_layer, m.n_head, m.block_size, m.vocab_size, m.mhc.hc_mult
    if m.attn == "mla":
        a = m.mla
        qk = H * (a.qk_nope_head_dim + a.qk_rope_head_dim)
        attn = (d * a.q_lora_rank + a.q_lora_rank * qk if a.q_lora_rank else d * qk) + \
            d * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * H * (a.qk_nope_head_dim + a.v_head_dim) + \
            H * a.v_head_dim * d
    else:
        attn = 4 * d * d
    n_moe = max(0, L - moe.n_dense_layers) if m.ffn == "moe" else 0
    experts = 3 * d * moe.moe_inter_dim * (moe.n_routed_experts + moe.n_shared_experts) + d * moe.n_routed_experts
    params = V * d + L * attn + n_moe * experts + (L - n_moe) * 3 * d * m.dense_hidden
    width = (moe.n_activated_experts + moe.n_shared_experts) * moe.moe_inter_dim if n_moe else m.dense_hidden
    tokens, cuda = cfg.batch_size * T, cfg.device.startswith("cuda")
    act = 2 if cuda and cfg.dtype != "float32" else 4  # bytes of an activation: autocast keeps 16-bit ones
    scores = 0 if cuda else H * T  # a GPU's fused attention never holds the T x T scores
    engram = m.engram
    tables = 0 if cfg.engram_offload or not engram.engram_layers else \
        table_params(engram) // shards * 4 * (3 if engram.engram_sparse else 4)
    return {"--n_embd (or --n_layer, --n_routed_experts, --moe_inter_dim)": 16 * params,
            "--engram_rows_per_head": tables,
            "--batch_size (or --block_size)": tokens * (act * L * (12 * d + 3 * width + scores) + 4 * 2 * V),
            "--hc_mult (or --hc_sinkhorn_iters)": 0 if n == 1 else
            4 * tokens * L * 2 * (4 * n * d + n * n * (2 * m.mhc.hc_sinkhorn_iters + 4))}


def check_step_fits(cfg, shards=1):
    """The model, its Adam state, the Engram tables and one step's activations and mHC maps (step_bytes) must
    fit in the device's memory: one line naming the flag to lower, before anything is allocated."""
    parts = step_bytes(cfg, shards)
    biggest = max(parts, key=parts.get)
    cli.check_fits(sum(parts.values()), cfg.device, "the model, its Adam state and one step's activations",
                   hint=f"lower {biggest}")


def sinkhorn_note(cfg) -> str:
    """A warning when --hc_sinkhorn_iters makes every step far slower than at the paper's 20: how long its
    Sinkhorn kernels alone take per step, estimated from their count (2 per iteration, for each of the
    2 maps a block, forward and backward) at ~10 us of launch and memory traffic each."""
    mhc, m = cfg.model.mhc, cfg.model
    if mhc.hc_mult == 1 or mhc.hc_sinkhorn_iters <= 200:  # n = 1 has no Sinkhorn; up to 10x the paper's 20 is fine
        return ""
    tokens = cfg.batch_size * m.block_size * cfg.gradient_accumulation_steps
    bandwidth = 1e12 if cfg.device.startswith("cuda") else 1e10  # bytes/s: a GPU's HBM, a CPU's DRAM

    def seconds(iters):
        kernels_per_step = 2 * iters * 2 * m.n_layer * 3
        return kernels_per_step * (1e-5 + 4 * 2 * tokens * mhc.hc_mult ** 2 / bandwidth)
    return (f"warning: --hc_sinkhorn_iters={mhc.hc_sinkhorn_iters}: each step spends about "
            f"{seconds(mhc.hc_sinkhorn_iters):,.1f} s in Sinkhorn's kernels alone (about {seconds(20) * 1000:,.0f} ms "
            "at the paper's 20)")


def check_table_placement(cfg, ddp, world, master) -> bool:
    """Whether the tables are sharded in this run: --engram_shard and --engram_offload checked against the
    model and the processes (one-line errors), and one process with --engram_shard said plainly."""
    engram = cfg.model.engram
    if (cfg.engram_shard or cfg.engram_offload) and not engram.engram_layers:
        flag = "--engram_shard=true" if cfg.engram_shard else f"--engram_offload={cfg.engram_offload}"
        raise cli.ConfigError(f"{flag}: this model has no Engram table (--engram=off); drop the flag")
    if cfg.engram_offload and ddp:
        raise cli.ConfigError("--engram_offload=host trains on one process; under torchrun use --engram_shard=true")
    if cfg.engram_offload and not engram.engram_sparse:
        raise cli.ConfigError("--engram_offload=host needs --engram_sparse=true: host rows are updated by SparseAdam")
    if cfg.engram_shard and not engram.engram_sparse:
        raise cli.ConfigError("--engram_shard=true needs --engram_sparse=true: a shard is updated by SparseAdam")
    if not cfg.engram_shard:
        return False
    if not ddp:
        if master:
            print("note: --engram_shard=true on one process: the one shard is the whole table (start with torchrun "
                  "--nproc_per_node=N to split it over N ranks)")
        return False
    smallest = min(min(sizes) for sizes in head_table_sizes(engram))
    if world > smallest:
        raise cli.ConfigError(f"--engram_shard=true over {world} ranks: every rank must own rows of every head, and "
                              f"the smallest head has {smallest} rows; raise --engram_rows_per_head or use fewer ranks")
    return True


def finished(ckpt, cfg, master) -> bool:
    """--resume of a run that has done its steps: say so, and how to go on; and say it when extending a
    run moves its learning rate (with lr_decay_iters=0 the cosine follows max_iters)."""
    done, saved_iters = ckpt["iter"], ckpt["config"]["max_iters"]
    if master and done >= cfg.max_iters:
        print(f"{cfg.out_dir}: the run is complete ({done} of --max_iters={cfg.max_iters} steps); to train it "
              f"further: python train.py --out_dir={cfg.out_dir} --resume --max_iters=N with N > {done}")
    elif master and cfg.max_iters != saved_iters and cfg.lr_decay_iters == 0:
        print(f"note: with --lr_decay_iters=0 the cosine follows --max_iters, so going from {saved_iters} to "
              f"{cfg.max_iters} steps moves the learning rate at step {done} from "
              f"{lr_at(done, dataclasses.replace(cfg, max_iters=saved_iters)):.2e} to {lr_at(done, cfg):.2e}; "
              f"--lr_decay_iters={saved_iters} keeps the old schedule")
    return done >= cfg.max_iters


# ----------------------------------------------------------------------------- reports

def announce(cfg, model, tok, meta, world, it, dtype):
    """What is about to train, on what data, where and how; the whole config goes to config.json."""
    harness.write_atomic(os.path.join(cfg.out_dir, "config.json"), json.dumps(dataclasses.asdict(cfg), indent=2).encode())
    counts, engram = model.param_counts(), cfg.model.engram
    sparse = " (sparse)" if engram.engram_sparse and engram.engram_layers else ""
    print(f"model: attn={cfg.model.attn} ffn={cfg.model.ffn} engram_layers={list(engram.engram_layers)} | "
          f"params total {counts['total'] / 1e6:.2f}M, active/token {counts['active'] / 1e6:.2f}M, "
          f"engram tables {counts['engram_tables'] / 1e6:.2f}M{sparse} "
          f"| vocab {tok.vocab_size}")
    if model.compression is not None:
        print(f"engram: tokenizer compression {tok.vocab_size:,} -> {model.compression.n_canonical:,} canonical ids "
              f"({100 * model.compression.reduction:.1f}% fewer); n-gram orders {list(engram.ngram_orders)}")
    print(f"data: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens; preset={cfg.preset} "
          f"device={cfg.device} world={world}" + (f"; resuming at iter {it}" if it else ""))
    hardware = cli.describe_device(cfg.device)
    cc = f", compute capability {'.'.join(map(str, hardware['capability']))}" if hardware["capability"] else ""
    how = {"float32": "float32", "bfloat16": "bfloat16 autocast", "float16": "float16 autocast with loss scaling"}
    plan = kernels.plan(cfg.device, getattr(torch, dtype))
    uses = f"all {plan[kernels.OPS[0]]}" if len(set(plan.values())) == 1 else \
        ", ".join(f"{op}={use}" for op, use in plan.items())
    print(f"precision: {how[dtype]} (--dtype={cfg.dtype} on {hardware['name']}{cc}) | kernels: {uses}")
    if note := dense_table_note(cfg):
        print(note)


if __name__ == "__main__":
    main()
