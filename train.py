"""Train a nano-engram GPT on TinyStories.

    python train.py                                  # preset chosen by device (cpu or gpu)
    python train.py --source=../shared/tinystories   # offline: local TinyStories text
    python train.py --preset=cpu --engram=off --max_iters=500
    torchrun --nproc_per_node=2 train.py             # DDP (nccl on GPU, gloo on CPU)

The run folder gets config.json, log.jsonl (one line per evaluation), loss.png and ckpt.pt.
--resume continues a run exactly where it stopped. Ctrl-C or SIGTERM lets the current step
finish, then evaluates, saves and exits; a second one stops at once.
"""
import dataclasses
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
import data
import harness
import kernels
import memory
import mhc
from data import DataConfig, DataError, Tokenizer, batch_at, load_tokens, val_starts
from model import GPT, GPTConfig, step_bytes


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
    engram_offload: str = ""          # 'host': Engram's tables stay in host memory, each batch's rows gathered a step ahead; '' = on the device (training reads no table from disk: sample.py does)
    data: DataConfig = field(default_factory=DataConfig)
    model: GPTConfig = field(default_factory=GPTConfig)

    def __post_init__(self):
        cli.check_numbers(self, seeds=("seed",), at_least_1=("max_iters", "eval_interval", "eval_iters", "batch_size",
                          "gradient_accumulation_steps"), nonneg=("learning_rate", "min_lr", "warmup_iters",
                          "lr_decay_iters", "weight_decay", "grad_clip"), one_of={"preset": ("", *PRESETS),
                          "dtype": cli.DTYPES, "kernels": kernels.MODES, "engram_offload": ("", "host")})
        if self.min_lr > self.learning_rate:  # 0 and 0 freeze the weights: the optimizers step, nothing moves
            raise ValueError(f"--min_lr={self.min_lr} is above --learning_rate={self.learning_rate}: the decay would "
                             "raise the rate; give --min_lr <= --learning_rate (0 and 0 freeze the weights)")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"--beta1={self.beta1}, --beta2={self.beta2}: each must be in [0, 1)")
        if self.engram_offload and self.engram_shard:
            raise ValueError("--engram_offload=host and --engram_shard=true: choose one (host tables train on one "
                             "process; sharded tables split them over torchrun's ranks)")


# Presets are plain overrides, applied before the command line's.
PRESETS = {
    # Minutes on 2 CPU cores (RESULTS.md, "The CPU preset"): ~0.8M tokens, 1.6 epochs of the 0.5M-token excerpt in ../shared
    # (past ~2 epochs the validation loss turns up). Short runs need the router bias to adapt faster than
    # DeepSeek-V3's 1e-3 per step, hence bias_update_speed. The Engram table's rows follow the train
    # split (cli.rows_for_split) unless --engram_rows_per_head is given.
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


def config(argv) -> TrainConfig:
    """The run's config: defaults <- preset <- command line, or with --resume the checkpoint's <- the
    command line (cli.train_config)."""
    return cli.train_config(argv, TrainConfig(), PRESETS, __doc__, harness.saved_config, data.split_tokens)


def main(argv=None):
    # until the loop takes over the signals (harness.Guard), SIGTERM stops start-up as Ctrl-C does
    sigterm = signal.signal(signal.SIGTERM, harness.interrupt)
    try:
        train(config(sys.argv[1:] if argv is None else argv))
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
    """Everything a run does, in order: processes and checks, data, model and optimizers, then the loop."""
    # processes and checks: DDP ranks, the checkpoint to continue, where the tables live, whether it all fits
    ddp, rank, world, cfg.device = harness.init_distributed(cfg.device)
    master, device_type = rank == 0, torch.device(cfg.device).type  # 'cuda', 'cpu' or 'mps'
    ckpt_path, log_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "log.jsonl")
    ckpt = harness.load_checkpoint(ckpt_path) if cfg.resume else None
    if ckpt is not None and finished(ckpt, cfg, master):
        return
    shards = harness.check_run(cfg, ddp, world, master)  # shards: world when the tables are split over the ranks

    # data: prepared once per machine, the token files checked against meta.json, then memory-mapped
    meta = harness.on_first_rank(lambda: data.load_or_prepare(cfg.data), ddp, per_machine=True) \
        or data.load_or_prepare(cfg.data)  # the other ranks read (and check) what the first one wrote
    tok = Tokenizer.from_meta(meta)
    train_tokens, val_tokens = (load_tokens(cfg.data.data_dir, split) for split in ("train", "val"))
    cfg.model = dataclasses.replace(cfg.model, vocab_size=tok.vocab_size)
    cli.check_fits(step_bytes(cfg.model, cfg.batch_size, cfg.device, cfg.dtype, not cfg.engram_offload, shards),
                   cfg.device, "the model, its Adam state and one step's activations")
    # the same validation windows in every run; under DDP each rank scores its part of each batch
    starts = val_starts(len(val_tokens), cfg.eval_iters * cfg.batch_size * world, cfg.model.block_size)

    # model and optimizers: AdamW, plus lazy Adam for sparse Engram tables
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = raw_model = GPT(cfg.model, token_bytes=tok.token_bytes())
    tables = memory.Tables(raw_model, cfg.device, offload=cfg.engram_offload, shards=shards)  # before .to(device)
    raw_model.to(cfg.device)
    optimizers = raw_model.configure_optimizers(cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                                device_type)
    batches = data.Batches(train_tokens, cfg.batch_size, cfg.model.block_size, cfg.seed, cfg.device, rank, world)
    # precision by hardware: autocast in bf16 or fp16, or plain fp32. fp16's narrow range needs loss scaling:
    # the scaler multiplies the loss before backward and divides the gradients after (else every call a no-op)
    dtype, autocast, scaler = cli.precision(cfg.dtype, cfg.device)
    it, tokens_seen, elapsed = harness.restore(tables.cut(ckpt, optimizers), raw_model, optimizers, batches.rng,
                                               scaler) if ckpt else (0, 0, 0.0)
    if master:  # the run has started: only now is an old run (--overwrite=true) moved aside
        harness.begin_run(cfg)
        harness.announce(cfg, raw_model, tok, meta, world, it, dtype)
        harness.trim_log(log_path, it)
    if cfg.compile:
        model = torch.compile(model)
    if ddp:  # DDP averages the dense gradients; the sparse tables' rows are averaged by memory.Tables
        model = harness.wrap_ddp(model, cfg.device, skip=memory.sparse_param_names(raw_model))
    tokens_per_iter = cfg.batch_size * cfg.model.block_size * cfg.gradient_accumulation_steps * world
    byte_lengths = tok.byte_lengths(cfg.device)  # for bits per byte
    val_loss = val_bpb = None
    if it == 0:  # the untrained model's loss anchors every curve
        val_loss, val_bpb = evaluate(raw_model, val_tokens, starts, cfg, autocast, rank, world, byte_lengths)
        if master:
            harness.append_log(log_path, harness.first_record(val_loss, val_bpb, mhc.log_fields(raw_model)))

    guard = harness.Guard(ddp, cfg.device, scaler, ckpt_path)  # takes Ctrl-C and SIGTERM from here on
    window = harness.Window()  # the losses, MoE loads and tokens since the last evaluation
    # a progress bar only on a terminal (disable=None): in a pipe or a log file it is noise
    bar = tqdm(total=cfg.max_iters, initial=it, disable=None if master else True, desc="train", dynamic_ncols=True)
    t_last, status = time.time(), 0
    try:
        while it < cfg.max_iters:
            # learning rate: linear warmup, then cosine decay; each group scales it (Engram's tables: x5)
            lr = lr_at(it, cfg)
            for g in (g for opt in optimizers for g in opt.param_groups):
                g["lr"] = lr * g["lr_mult"]

            # forward and backward over the micro-batches: the gradient of this step, clipped
            losses, grad_norm = train_step(model, batches, optimizers, scaler, autocast, cfg, tables)

            # the guard: a non-finite loss or gradient stops the run, an fp16 overflow skips the step (every
            # rank alike), and a stop signal ends the run once this step is saved
            skip, stopping, failure = guard.check(it, losses, grad_norm)
            if failure:
                if master:
                    bar.write(failure, file=sys.stderr)
                status = 1
                break

            # the step: AdamW moves every weight, lazy Adam only the table rows this batch looked up
            for opt in optimizers:
                if not skip:
                    scaler.step(opt)  # opt.step(), with the loss scale's bookkeeping under fp16
            tables.after_step()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            scaler.update()

            # aux-loss-free balancing: each MoE router's bias moves against its experts' load (DeepSeek-V3 §2.1.2)
            window.add(losses, raw_model.update_router_biases(), tokens_per_iter)
            it, tokens_seen = it + 1, tokens_seen + tokens_per_iter
            now = time.time()
            elapsed, t_last = elapsed + now - t_last, now
            bar.update(1)
            bar.set_postfix(step_loss=f"{losses[-1]:.3f}", lr=f"{lr:.1e}", tok_s=f"{window.tok_per_s():,.0f}")

            # evaluate, log and save: every eval_interval steps, at the end, and before a stop
            if it % cfg.eval_interval == 0 or it == cfg.max_iters or stopping:
                val_loss, val_bpb = evaluate(raw_model, val_tokens, starts, cfg, autocast, rank, world, byte_lengths)
                elapsed, t_last = elapsed + time.time() - t_last, time.time()  # evaluation is wall time too
                record = {"iter": it, "tokens": tokens_seen, **window.train_fields(), "val_loss": val_loss,
                          "val_bpb": val_bpb, "lr": lr, "tok_per_s": window.tok_per_s(), "elapsed_s": elapsed,
                          **window.load_fields(), **mhc.log_fields(raw_model), **guard.log_fields(),
                          **tables.log_fields(optimizers)}
                model_state, opt_states = tables.state(optimizers)  # whole tables, a sharded one assembled on rank 0
                state = {"model": model_state, "optimizers": opt_states, "scaler": scaler.state_dict(),
                         "config": dataclasses.asdict(cfg), "meta": meta, "iter": it, "tokens": tokens_seen,
                         "elapsed_s": elapsed, "rng": batches.rng.bit_generator.state,
                         "torch_rng": torch.get_rng_state()}
                harness.on_first_rank(lambda: bar.write(harness.save_evaluation(cfg.out_dir, record, state)), ddp)
                window = harness.Window()

            # stop: a signal asked for it, and the checkpoint above holds this step
            if stopping:
                if master:
                    bar.write(f"stopped by signal {guard.signal}: saved {ckpt_path} at iter {it}; continue with --resume")
                status = 128 + guard.signal
                break
    finally:
        bar.close()
        guard.close()
    if ddp:  # a sharded table differs by rank by design; every other parameter must agree
        model = None  # DDP's reducer goes before the process group it uses: freed after it, it can hang at exit
        harness.finish_distributed(raw_model, check_agreement=status == 0, skip=tables.sharded_names)
    if status:
        sys.exit(status)
    if master and val_loss is not None:
        print(harness.done_line(cfg.out_dir, val_loss, val_bpb, it, tokens_seen, elapsed))
    return raw_model


def train_step(model, batches, optimizers, scaler, autocast, cfg, tables):
    """The gradient of one optimizer step, ready for it: forward and backward over the micro-batches (DDP
    syncs on the last one), the tables' gradients averaged or agreed over the ranks (memory.Tables), fp16's
    loss scale divided out, and the whole clipped. Returns (each micro-batch's loss, the norm before clipping)."""
    ddp, losses = isinstance(model, torch.nn.parallel.DistributedDataParallel), []
    for micro in range(cfg.gradient_accumulation_steps):
        x, y = batches.next()
        last_micro = micro == cfg.gradient_accumulation_steps - 1
        with (model.no_sync() if ddp and not last_micro else nullcontext()), autocast:
            _, loss = model(x, y)
        tables.prefetch(batches.peek)  # host tables: the next batch's rows are gathered meanwhile
        scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
        losses.append(loss.item())
    tables.average_grads()  # DDP: the resident tables' sparse gradients, averaged over the ranks
    for opt in optimizers:
        scaler.unscale_(opt)  # fp16: the true gradients again, before they are clipped
    tables.agree_overflow(scaler, optimizers)  # sharded fp16: a shard's overflow skips the step on every rank
    return losses, clip_grad_norm(tables.model.parameters(), cfg.grad_clip, tables.sharded)


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
            g.mul_(scale.to(g.device))  # a host table's gradient lives on the CPU, the norm on the model's device
    return float(total)


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


if __name__ == "__main__":
    main()
