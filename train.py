"""Train a nano-engram GPT on TinyStories.

    python train.py                                  # preset chosen by device
    python train.py --source=../shared/tinystories   # offline: local TinyStories text
    python train.py --preset=cpu --engram=off --max_iters=500
    torchrun --nproc_per_node=2 train.py             # DDP (nccl on GPU, gloo on CPU)

Every config field below (and in data.DataConfig, model.GPTConfig and its
sub-configs) can be overridden as --key=value. The run directory gets
config.json, log.jsonl (one line per evaluation) and ckpt.pt; --resume
continues a run exactly where it stopped.
"""
import dataclasses
import difflib
import json
import math
import os
import signal
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import kernels
from data import DataConfig, DataError, Tokenizer, batch_at, get_batch, load_or_prepare, load_tokens, val_starts
from engram import EngramConfig
from model import GPT, GPTConfig


@dataclass
class TrainConfig:
    out_dir: str = "out"
    preset: str = ""                  # 'cpu' | 'gpu'; '' = chosen by device
    device: str = "auto"              # 'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps'
    compile: bool = False             # torch.compile the model
    resume: bool = False              # continue from out_dir/ckpt.pt
    seed: int = 1337
    max_iters: int = 2000
    eval_interval: int = 200
    eval_iters: int = 20              # validation batches per evaluation (fixed windows)
    batch_size: int = 32              # sequences per micro-batch
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-3
    min_lr: float = 3e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 0           # 0 = max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0            # 0 = off
    data: DataConfig = field(default_factory=DataConfig)
    model: GPTConfig = field(default_factory=GPTConfig)


# Presets are plain overrides, applied before the command line's.
PRESETS = {
    # About 6 minutes on 2 CPU cores: ~0.8M tokens, 1.6 epochs of the 0.5M-token excerpt in
    # ../shared (past ~2 epochs the validation loss turns up). Short runs need the router bias
    # to adapt faster than DeepSeek-V3's 1e-3 per step, hence bias_update_speed. Downloads only
    # the first 64 MB of the training split: far more than 0.8M tokens, far less than 1.9 GB.
    "cpu": dict(max_iters=400, eval_interval=50, eval_iters=10, batch_size=16, block_size=128,
                n_layer=6, n_head=8, n_embd=256, learning_rate=3e-3, min_lr=3e-4, warmup_iters=40,
                bias_update_speed=1e-2, max_train_mb=64.0),
    # A single modern GPU: a ~50M-parameter model on ~330M tokens (TinyStories has ~470M).
    "gpu": dict(max_iters=5000, eval_interval=250, eval_iters=40, batch_size=128, block_size=512,
                n_layer=8, n_head=8, n_embd=512, learning_rate=1.5e-3, min_lr=1.5e-4, warmup_iters=200,
                kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                moe_inter_dim=256, n_routed_experts=16, n_activated_experts=2, bias_update_speed=1e-3,
                engram_rows_per_head=65537, engram_dim_per_order=256),
}


class ConfigError(Exception):
    """A bad flag or value; main() prints it as one line."""


# ----------------------------------------------------------------------------- command line

def flat_fields(cfg):
    """{field name: (dataclass instance owning it, its declared type)} across nested configs.
    Sub-config names are unique, so the command line can stay flat (--kv_lora_rank=64)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_fields(value))
        else:
            out[f.name] = (cfg, typing.get_origin(f.type) or f.type)  # tuple[int, ...] -> tuple
    return out


def parse_value(key, text, typ):
    try:
        if typ is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is tuple:
            return tuple(int(t) for t in text.replace(" ", "").split(",") if t)
        return typ(text)
    except ValueError:
        kind = "comma-separated integers" if typ is tuple else typ.__name__
        raise ConfigError(f"--{key}={text}: expected {kind}") from None


def parse_flags(argv):
    """['--a=1', '--b', '2', '--flag'] -> {'a': '1', 'b': '2', 'flag': 'true'}."""
    flags, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: use --key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"
        flags[key] = value
        i += 1
    return flags


def apply_flags(cfg, flags):
    """Set each --key=value on the (nested) dataclass cfg, type-checked."""
    table = flat_fields(cfg)
    for key, text in flags.items():
        if key not in table:
            near = difflib.get_close_matches(key, table, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join('--' + n for n in near)}?" if near else ""
            raise ConfigError(f"unknown flag --{key}{hint}")
        owner, typ = table[key]
        setattr(owner, key, parse_value(key, text, typ) if isinstance(text, str) else text)
    return cfg


def default_device():
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def build_config(argv):
    """Defaults <- preset (chosen by device unless given) <- command line.
    With --resume: the run's saved config.json <- the flags given now (not the model's)."""
    flags = parse_flags(argv)
    if "engram" in flags:  # --engram=off is shorthand for an empty layer list
        choice = flags.pop("engram").lower()
        if choice not in ("on", "off"):
            raise ConfigError(f"--engram={choice}: expected on or off")
        flags["engram_layers"] = "" if choice == "off" else ",".join(map(str, EngramConfig().engram_layers))
    if parse_value("resume", flags.get("resume", "false"), bool):
        cfg = saved_config(flags)
    else:
        cfg = TrainConfig()
        device = flags.get("device", cfg.device)
        device = default_device() if device == "auto" else device
        cfg.preset = flags.get("preset") or ("gpu" if device.startswith("cuda") else "cpu")
        if cfg.preset not in PRESETS:
            raise ConfigError(f"--preset={cfg.preset}: expected one of {', '.join(PRESETS)}")
        apply_flags(cfg, PRESETS[cfg.preset])
    apply_flags(cfg, flags)
    cfg.device = default_device() if cfg.device == "auto" else cfg.device
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={cfg.device}: no CUDA GPU is available; use --device=cpu")
    try:  # re-validate the model config after the overrides
        cfg.model = GPTConfig.from_dict(dataclasses.asdict(cfg.model))
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    try:  # --kernels=triton needs triton and a GPU (or the interpreter): say so now, not mid-run
        kernels.use_triton(cfg.model.kernels, "cuda" if cfg.device.startswith("cuda") else cfg.device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name in ("max_iters", "batch_size", "eval_iters", "eval_interval", "gradient_accumulation_steps"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name}={getattr(cfg, name)}: must be at least 1")
    return cfg


def saved_config(flags):
    """The config of the run in --out_dir, for --resume. Flags given now may change how it
    trains (max_iters, device, kernels, ...) but not the model its checkpoint holds."""
    out_dir = flags.get("out_dir", TrainConfig.out_dir)
    path = os.path.join(out_dir, "config.json")
    if not os.path.exists(os.path.join(out_dir, "ckpt.pt")) or not os.path.exists(path):
        raise ConfigError(f"no checkpoint to resume in {out_dir}: train one first (python train.py --out_dir=...)")
    with open(path) as f:
        saved = json.load(f)
    model_keys = set(flat_fields(GPTConfig())) - {"kernels"}
    fixed = sorted(k for k in flags if k in model_keys or k == "preset")
    if fixed:
        raise ConfigError(f"--{fixed[0]}: a resumed run keeps its model and preset; "
                          "drop the flag, or train a new run in another --out_dir")
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"data", "model"}
    return TrainConfig(**{k: v for k, v in saved.items() if k in train_fields},
                       data=DataConfig(**saved["data"]), model=GPTConfig.from_dict(saved["model"]))


# ----------------------------------------------------------------------------- training helpers

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
def evaluate(model, val_tokens, starts, batch_size, block_size, device, autocast):
    """Mean loss over the fixed validation windows (the same for every run)."""
    model.eval()
    losses = []
    for i in range(0, len(starts), batch_size):
        x, y = batch_at(val_tokens, starts[i:i + batch_size], block_size, device)
        with autocast:
            _, loss = model(x, y)
        losses.append(loss.item())
    model.train()
    return float(np.mean(losses))


def save_checkpoint(path, state):
    """Atomic write: a crash mid-save never leaves a broken ckpt.pt behind."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    """Load ckpt.pt or raise ConfigError with a one-line reason."""
    if not os.path.exists(path):
        raise ConfigError(f"no checkpoint at {path}: train one first (python train.py --out_dir=...)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # truncated file, not a checkpoint, ...
        raise ConfigError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it and retrain") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ConfigError(f"checkpoint {path} is not a nano-engram checkpoint")
    return ckpt


def trim_log(log_path, last_iter):
    """On resume, drop log lines written after the checkpoint (they will be redone)."""
    if not os.path.exists(log_path):
        return
    keep = []
    with open(log_path) as f:
        for line in f:
            try:
                if json.loads(line)["iter"] <= last_iter:
                    keep.append(line)
            except (ValueError, KeyError):  # a line cut short by a crash mid-write
                continue
    with open(log_path, "w") as f:
        f.writelines(keep)


def check_ranks_agree(model, world, master):
    """DDP sanity check: after training, every rank must hold the same weights."""
    local = torch.stack([p.detach().double().sum() for p in model.parameters()]).cpu()
    gathered = [None] * world
    dist.all_gather_object(gathered, local)
    if any(not torch.equal(gathered[0], g) for g in gathered[1:]):
        raise RuntimeError("DDP ranks diverged: their parameters differ after training")
    if master:
        print(f"ddp: parameters identical on all {world} ranks")


# ----------------------------------------------------------------------------- main loop

def train(cfg: TrainConfig):
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = 0, 1
    if ddp:
        backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        if cfg.device.startswith("cuda"):
            cfg.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(cfg.device)
    master = rank == 0
    device_type = "cuda" if cfg.device.startswith("cuda") else "cpu"
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    log_path = os.path.join(cfg.out_dir, "log.jsonl")

    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(ckpt_path)
        saved = ckpt["config"]
        kernel_mode = cfg.model.kernels  # how to compute stays this command's choice
        cfg.model = GPTConfig.from_dict(saved["model"])  # the architecture comes from the checkpoint
        cfg.model.kernels = kernel_mode
        cfg.data = DataConfig(**saved["data"])

    meta = prepare_data(cfg.data, ddp, world)
    tok = Tokenizer.from_meta(meta)
    train_tokens = load_tokens(cfg.data.data_dir, "train")
    val_tokens = load_tokens(cfg.data.data_dir, "val")
    cfg.model.vocab_size = tok.vocab_size
    block_size = cfg.model.block_size
    n_val_windows = cfg.eval_iters * cfg.batch_size
    starts = val_starts(len(val_tokens), n_val_windows, block_size)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = GPT(cfg.model, token_bytes=tok.token_bytes()).to(cfg.device)
    optimizer = model.configure_optimizer(cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2), device_type)
    rng = np.random.default_rng(cfg.seed + rank)  # each rank draws its own batches
    it, tokens_seen, elapsed = 0, 0, 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        it, tokens_seen, elapsed = ckpt["iter"], ckpt["tokens"], ckpt["elapsed_s"]
        if rank < len(ckpt["rng"]):  # a rank the saved run did not have keeps its fresh stream
            rng.bit_generator.state = ckpt["rng"][rank]
        torch.set_rng_state(ckpt["torch_rng"])
        if master:
            trim_log(log_path, it)

    counts = model.param_counts()
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        if ckpt is None and os.path.exists(log_path):
            os.remove(log_path)  # a fresh run starts a fresh curve
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
        print(f"model: attn={cfg.model.attn} ffn={cfg.model.ffn} engram_layers={list(cfg.model.engram.engram_layers)} | "
              f"params total {counts['total'] / 1e6:.2f}M, active/token {counts['active'] / 1e6:.2f}M, "
              f"engram tables {counts['engram_tables'] / 1e6:.2f}M | vocab {tok.vocab_size}")
        hasher = model.engram_hasher
        if hasher is not None:
            print(f"engram: tokenizer compression {tok.vocab_size:,} -> {hasher.n_canonical:,} canonical ids "
                  f"({100 * hasher.reduction:.1f}% fewer); n-gram orders {list(cfg.model.engram.ngram_orders)}")
        print(f"data: {len(train_tokens):,} train / {len(val_tokens):,} val tokens; "
              f"preset={cfg.preset} device={cfg.device} world={world}"
              + (f"; resuming at iter {it}" if ckpt else ""))

    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        # no buffer broadcast: the MoE biases stay equal through update_bias's all-reduce, and the
        # load counters are per rank until then
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[int(cfg.device.split(":")[1])] if device_type == "cuda" else None,
            broadcast_buffers=False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()
    tokens_per_iter = cfg.batch_size * block_size * cfg.gradient_accumulation_steps * world

    def checkpoint_state():
        rng_states = [rng.bit_generator.state]
        if ddp:  # every rank's data position, so all of them resume where they were
            rng_states = [None] * world
            dist.all_gather_object(rng_states, rng.bit_generator.state)
        return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "config": dataclasses.asdict(cfg), "meta": meta, "iter": it, "tokens": tokens_seen,
                "elapsed_s": elapsed, "rng": rng_states, "torch_rng": torch.get_rng_state()}

    def log_eval(record):
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    if it == 0 and master:  # the untrained model's loss anchors every curve
        val0 = evaluate(raw_model, val_tokens, starts, cfg.batch_size, block_size, cfg.device, autocast)
        log_eval({"iter": 0, "tokens": 0, "train_loss": None, "val_loss": val0, "lr": 0.0, "tok_per_s": 0.0,
                  "elapsed_s": 0.0})
    # Ctrl-C asks the loop to stop at the end of the current step: the checkpoint then holds a
    # step boundary (weights, optimizer and data position agree), so --resume is exact.
    stop = {"requested": False}

    def request_stop(signum, frame):
        if stop["requested"]:  # a second Ctrl-C: give up at once, keeping the last checkpoint
            raise KeyboardInterrupt
        stop["requested"] = True

    previous_handler = signal.signal(signal.SIGINT, request_stop)
    recent_losses, load_stats, window_t0, window_tokens = [], [], time.time(), 0
    bar = tqdm(total=cfg.max_iters, initial=it, disable=not master, desc="train", dynamic_ncols=True)
    t_last = time.time()
    status = 0
    try:
        while it < cfg.max_iters:
            lr = lr_at(it, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr * g["lr_mult"]
            step_losses = []
            for micro in range(cfg.gradient_accumulation_steps):
                x, y = get_batch(train_tokens, cfg.batch_size, block_size, rng, cfg.device)
                sync = not ddp or micro == cfg.gradient_accumulation_steps - 1
                with (nullcontext() if sync else model.no_sync()), autocast:
                    _, loss = model(x, y)
                    loss = loss / cfg.gradient_accumulation_steps
                loss.backward()
                step_losses.append(loss.item() * cfg.gradient_accumulation_steps)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else 0.0
            # every rank learns whether any rank saw a non-finite loss or was asked to stop
            nonfinite, stopping = agree(not all(map(math.isfinite, step_losses + [float(grad_norm)])),
                                        stop["requested"], ddp, cfg.device)
            if nonfinite:
                if master:
                    bar.write(f"error: loss or gradient became non-finite at iter {it} (last loss {step_losses[-1]}); "
                              f"stopping without saving. The last good checkpoint, if any, is {ckpt_path}. "
                              "Try a lower --learning_rate.", file=sys.stderr)
                status = 1
                break
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            moe_load = raw_model.update_router_biases()  # aux-loss-free balancing (DeepSeek-V3 §2.1.2)
            if moe_load:
                load_stats.append({k: v["max_over_mean"] for k, v in moe_load.items()})
            recent_losses += step_losses
            it += 1
            tokens_seen += tokens_per_iter
            window_tokens += tokens_per_iter
            now = time.time()
            elapsed += now - t_last
            t_last = now
            tok_per_s = window_tokens / max(now - window_t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{step_losses[-1]:.3f}", lr=f"{lr:.1e}", tok_s=f"{tok_per_s:,.0f}")

            if it % cfg.eval_interval == 0 or it == cfg.max_iters or stopping:
                val_loss = evaluate(raw_model, val_tokens, starts, cfg.batch_size, block_size, cfg.device, autocast)
                t_eval = time.time()
                elapsed += t_eval - t_last  # evaluation time counts as wall time too
                t_last = t_eval
                if master:
                    record = {"iter": it, "tokens": tokens_seen, "train_loss": float(np.mean(recent_losses)),
                              "val_loss": val_loss, "lr": lr, "tok_per_s": tok_per_s, "elapsed_s": elapsed}
                    if load_stats:  # mean over the window's steps of each MoE layer's max/mean expert load
                        record["moe_max_over_mean"] = {str(k): round(float(np.mean([s[k] for s in load_stats])), 3)
                                                       for k in load_stats[0]}
                    log_eval(record)
                    bar.write(f"iter {it}: train {record['train_loss']:.4f} val {val_loss:.4f} "
                              f"({tok_per_s:,.0f} tok/s, {elapsed:.0f}s)")
                state = checkpoint_state()  # collective under DDP: every rank takes part
                if master:
                    save_checkpoint(ckpt_path, state)
                recent_losses, load_stats, window_t0, window_tokens = [], [], time.time(), 0
            if stopping:
                if master:
                    bar.write(f"interrupted: saved {ckpt_path} at iter {it}; continue with --resume")
                status = 130
                break
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous_handler)
    if ddp:
        if status == 0:
            check_ranks_agree(raw_model, world, master)
        dist.destroy_process_group()
    if status:
        sys.exit(status)
    return raw_model


def prepare_data(data_cfg, ddp, world):
    """Prepare the data once per machine (downloading if needed), then let every rank read it.
    Under DDP a failure on the preparing rank reaches every rank as the same DataError."""
    local_master = int(os.environ.get("LOCAL_RANK", "0")) == 0
    meta, error = None, None
    if local_master:
        try:
            meta = load_or_prepare(data_cfg)
        except DataError as e:
            error = str(e)
    if ddp:
        errors = [None] * world
        dist.all_gather_object(errors, error)  # also a barrier: the files exist after it
        error = next((e for e in errors if e), None)
    if error:
        raise DataError(error)
    return meta if meta is not None else load_or_prepare(data_cfg)


def agree(nonfinite, stop_requested, ddp, device):
    """Under DDP, OR each flag over all ranks, so that every rank takes the same branch."""
    if not ddp:
        return nonfinite, stop_requested
    flags = torch.tensor([float(nonfinite), float(stop_requested)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0]), bool(flags[1])


def main(argv=None):
    try:
        cfg = build_config(sys.argv[1:] if argv is None else argv)
        train(cfg)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
