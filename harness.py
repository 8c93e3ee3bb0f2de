"""The harness around train.py's loop, so that the loop shows only training: a run's files
(checkpoint, log.jsonl, loss.png, gates.png) and its processes (DDP ranks, stop signals).
sample.py and compare.py read and write the same files through it.
"""
import dataclasses
import errno
import inspect
import json
import math
import os
import shutil
import sys
import signal
import time

import numpy as np
import torch
import torch.distributed as dist

import cli
import kernels
import memory
import mhc
import plots
from cli import ConfigError
from data import Tokenizer
from model import GPT, GPTConfig


# ----------------------------------------------------------------------------- a run's files

def check_writable_dir(path: str, flag: str):
    """Make the folder and prove it can hold files now, so that a bad --out_dir fails before any work."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--{flag}={path}: cannot write there ({e.strerror or e}); choose another folder") from None


def load_checkpoint(path: str) -> dict:
    """A checkpoint's contents (tensors on the CPU, memory-mapped so a large one loads lazily), or a
    one-line ConfigError that says what is wrong with the file."""
    if not os.path.exists(path):
        raise ConfigError(f"no checkpoint at {path}: train one first (python train.py --out_dir=...)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # truncated, not a checkpoint, written by something else ...
        raise ConfigError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it and retrain") from None
    if not isinstance(ckpt, dict) or not {"model", "config"} <= set(ckpt):
        raise ConfigError(f"checkpoint {path} is not a nano-engram checkpoint")
    ckpt["model"] = {plain_name(k): v for k, v in ckpt["model"].items()}
    return ckpt


def saved_config(out_dir: str) -> dict:
    """The config saved with the run in out_dir (its checkpoint's), for --resume; a run training there now
    is said to be so, not taken for an odd checkpoint."""
    check_unlocked(out_dir)
    return load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["config"]


def plain_name(key: str) -> str:
    """A parameter's name without the wrappers' prefixes: torch.compile's '_orig_mod.' and DDP's 'module.'
    (train.py saves the unwrapped model, but a checkpoint written by other code may carry them)."""
    while key.startswith(("_orig_mod.", "module.")):
        key = key.partition(".")[2]
    return key


# The only files the scripts write into a run folder (and their .tmp while being written). A folder is a run of
# this project if it holds one of RUN_MARKS; the scripts touch nothing else in it, and no folder that is not
# a run, empty or new. LOCK holds the pid of the run training there; REPLACED the run --overwrite replaced.
RUN_FILES = ("ckpt.pt", "log.jsonl", "config.json", "loss.png", "gates.png", "engram_tables.bin", "engram_tables.json")
RUN_MARKS = ("ckpt.pt", "log.jsonl", "config.json")
LOCK, REPLACED = ".lock", ".replaced"


def own_file(name: str) -> bool:
    """A name this project writes into a run folder: its files, their .tmp, the lock, the replaced run."""
    return name in RUN_FILES or name.removesuffix(".tmp") in RUN_FILES or name in (LOCK, REPLACED, ".DS_Store") \
        or name.startswith(".write-test-")


def check_out_dir(cfg):
    """Before any work, and changing nothing but the lock: out_dir can be written; it is new, empty or a run
    of this project (not a folder of other files); a fresh start would not replace a run without
    --overwrite=true; and no other process trains there. Then this process holds its lock (release_lock)."""
    check_writable_dir(cfg.out_dir, "out_dir")
    names = set(os.listdir(cfg.out_dir))
    foreign = sorted(n for n in names if not own_file(n))
    if foreign and not names & set(RUN_MARKS):
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ConfigError(f"--out_dir={cfg.out_dir} is not empty and holds no nano-engram run ({shown}); "
                          "choose a new or empty folder")
    if not cfg.resume and names & {"ckpt.pt", "log.jsonl"} and not cfg.overwrite:
        raise ConfigError(f"--out_dir={cfg.out_dir} holds a run already; continue it with --resume, choose "
                              "another --out_dir, or replace it with --overwrite=true")
    take_lock(cfg.out_dir)


def check_run(cfg, ddp: bool, world: int, master: bool) -> int:
    """Everything a run can be refused for before it starts, changing nothing but taking out_dir's lock: where
    the Engram tables live and whether they fit (memory.py), and the run folder (check_out_dir). Warns of a
    Sinkhorn count that makes every step slow. Returns how many shards each table is cut into (1 unless
    sharded over the torchrun ranks)."""
    shards = memory.check_placement(cfg, ddp, world, master)
    memory.check_tables_fit(cfg.model.engram, "cpu" if cfg.engram_offload else cfg.device, shards)
    on_first_rank(lambda: check_out_dir(cfg), ddp)
    if master and (note := mhc.sinkhorn_warning(cfg.model, cfg.batch_size * cfg.gradient_accumulation_steps,
                                                 cfg.device)):
        print(note, file=sys.stderr)
    return shards


def done_line(out_dir, val_loss, val_bpb, it, tokens, elapsed) -> str:
    """The run's last line: where it ended and where its files are."""
    return (f"done: val loss {val_loss:.4f} ({val_bpb:.4f} bits per byte) after {it:,} steps, {tokens:,} tokens, "
            f"{elapsed / 60:.1f} min ({tokens / elapsed:,.0f} tok/s, evaluations included); checkpoint "
            f"{os.path.join(out_dir, 'ckpt.pt')}, log {os.path.join(out_dir, 'log.jsonl')}, plot "
            f"{os.path.join(out_dir, 'loss.png')}")


def first_record(val_loss: float, val_bpb: float, extra: dict) -> dict:
    """log.jsonl's record of step 0: the untrained model's loss, nothing trained yet."""
    return {"iter": 0, "tokens": 0, "train_loss_mean": None, "train_loss_last": None, "val_loss": val_loss,
            "val_bpb": val_bpb, "lr": 0.0, "tok_per_s": 0.0, "elapsed_s": 0.0, **extra}


def begin_run(cfg):
    """Once the new run is known to start (checked, data ready, model built): the .tmp files of a save cut
    short go, and a fresh start (--overwrite=true) moves the old run's files into out_dir/.replaced (which
    the next --overwrite=true empties), so that an error before this point leaves the old run as it was."""
    names = os.listdir(cfg.out_dir)
    for name in names:
        if name.endswith(".tmp") and own_file(name):
            os.remove(os.path.join(cfg.out_dir, name))
    old = [n for n in names if n in RUN_FILES]
    if cfg.resume or not old:
        return
    aside = os.path.join(cfg.out_dir, REPLACED)
    try:
        shutil.rmtree(aside, ignore_errors=True)
        os.makedirs(aside)
        for name in old:
            os.replace(os.path.join(cfg.out_dir, name), os.path.join(aside, name))
    except OSError as e:
        raise ConfigError(f"--overwrite=true: could not move the old run aside into {aside} ({e.strerror or e})") from None
    print(f"note: --overwrite=true: the run that was in {cfg.out_dir} is now in {aside} (until the next --overwrite)")


# ----------------------------------------------------------------------------- the run folder's lock

HELD_LOCKS = set()  # the lock files this process took


def lock_holder(out_dir: str):
    """The pid of another live process holding out_dir's lock, or None (no lock, or a stale one: its
    process has ended, or it is this process's own from an earlier run)."""
    path = os.path.join(out_dir, LOCK)
    for _ in range(2):  # a lock being written this instant may be empty for a moment
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            return None
        if text:
            break
        time.sleep(0.1)
    try:
        pid = int(text)
    except ValueError:
        return None
    if pid == os.getpid() or pid <= 0:
        return None
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return None
    except PermissionError:  # it exists, owned by someone else
        return pid
    return pid


def check_unlocked(out_dir: str):
    if (pid := lock_holder(out_dir)) is not None:
        raise ConfigError(f"--out_dir={out_dir} is in use: process {pid} is training there (its lock is "
                          f"{os.path.join(out_dir, LOCK)}); wait for it to end, or stop it")


def take_lock(out_dir: str):
    """out_dir/.lock, created only if absent (O_CREAT | O_EXCL), holding this process's pid; a stale one is
    taken over, a live one is a one-line error naming its pid."""
    path = os.path.join(out_dir, LOCK)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            check_unlocked(out_dir)
            try:
                os.remove(path)  # stale: its process is gone
            except FileNotFoundError:
                pass
            continue
        except OSError as e:
            raise ConfigError(f"--out_dir={out_dir}: cannot create its lock {path} ({e.strerror or e})") from None
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        HELD_LOCKS.add(os.path.abspath(path))
        return
    raise ConfigError(f"--out_dir={out_dir}: another process keeps taking its lock {path}; try again")


def release_lock(out_dir: str):
    """Remove out_dir's lock if this process took it (every exit of train.train, errors and signals too)."""
    path = os.path.abspath(os.path.join(out_dir, LOCK))
    if path not in HELD_LOCKS:
        return
    HELD_LOCKS.discard(path)
    try:
        with open(path) as f:
            mine = f.read().strip() == str(os.getpid())
        if mine:
            os.remove(path)
    except OSError:
        pass


def interrupt(signum, frame):
    """A SIGTERM handler for start-up (before train.py's loop has its StopRequest): stop like Ctrl-C."""
    raise KeyboardInterrupt


def restore(ckpt, model, optimizers, rng, scaler):
    """Weights, optimizer moments, the fp16 loss scale, RNG states and counters from a checkpoint (one line
    if they do not fit). The tensors come from the CPU and land on the model's device, wherever it was saved."""
    try:
        model.load_state_dict(ckpt["model"])
        for opt, state in zip(optimizers, ckpt["optimizers"], strict=True):
            opt.load_state_dict(state)
        if scaler.is_enabled() and ckpt.get("scaler"):  # a run that trained in fp16 before: its loss scale
            scaler.load_state_dict(ckpt["scaler"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise ConfigError(f"the checkpoint's weights do not fit its config ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:100]}); retrain it in a fresh --out_dir") from None
    rng.bit_generator.state = ckpt["rng"]
    torch.set_rng_state(ckpt["torch_rng"])
    return ckpt["iter"], ckpt["tokens"], ckpt["elapsed_s"]


def load_run(out_dir, device, offload=""):
    """The trained GPT (in eval mode, on device) and its tokenizer from out_dir/ckpt.pt. offload='host' or
    'disk': Engram's tables are never made on the device (memory.OffloadedTable); 'disk' reads them from
    out_dir/engram_tables.bin, written from the checkpoint the first time, so no table need fit in memory."""
    path = os.path.join(out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path)  # memory-mapped: a table is read only where it is used
    try:
        cfg = GPTConfig.from_dict(ckpt["config"]["model"])
        tables = {k: v for k, v in ckpt["model"].items() if k.endswith(".engram.table.weight")}
        if offload and not tables:
            raise ConfigError(f"--engram_offload={offload}: {path} has no Engram table (it was trained with "
                                  "--engram=off); drop the flag")
        model = GPT(cfg, table_device="meta" if offload else None)
        missing = model.load_state_dict({k: v for k, v in ckpt["model"].items() if not (offload and k in tables)},
                                        strict=not offload).missing_keys
        if set(missing) != (set(tables) if offload else set()):
            raise RuntimeError(f"missing {sorted(set(missing) - set(tables))[:3]}")
        tok = Tokenizer.from_meta(ckpt["meta"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # written by another version of the code?
        raise ConfigError(f"checkpoint {path} does not fit this code ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120]}); retrain it") from None
    if offload == "disk":
        if not os.path.exists(os.path.join(out_dir, memory.MANIFEST)):
            memory.write_table_file(out_dir, tables)  # a one-line error, and no note, if it cannot be written
            print(f"note: wrote {os.path.join(out_dir, memory.TABLE_FILE)} from the checkpoint, once "
                  f"({sum(t.numel() for t in tables.values()) * 4 / 2**20:,.1f} MiB)", file=sys.stderr)
        tables = memory.open_table_file(out_dir, tables)
    if offload:
        memory.offload_tables(model, offload, device, tables)
    return model.to(device).eval(), tok


def save_checkpoint(path: str, state: dict):
    """Atomic: the state goes to path.tmp, which then replaces path, so that a crash or a full disk
    never leaves a broken checkpoint; on failure the .tmp is removed and the previous one stays."""
    tmp = path + ".tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ConfigError(f"could not save {path} ({str(e).splitlines()[0][:80]}; is the disk full?); "
                          "the previous checkpoint is kept") from None


# ----------------------------------------------------------------------------- a run's log.jsonl and plots

def read_log(path: str) -> list:
    """The records of a log.jsonl, one per evaluation; a last line cut short by a crash is skipped."""
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
    return records


def full_disk_error(path: str, e: OSError) -> ConfigError:
    """The one line for a file that could not be written: a full disk (ENOSPC), a quota, a read-only folder."""
    hint = "; free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return ConfigError(f"could not write {path} ({e.strerror or e}{hint}); its previous contents are kept")


def replace_file(path: str, write):
    """write(tmp) makes path's new contents in path.tmp, which then replaces path: a crash or a full disk
    leaves the old file whole (and no .tmp); a one-line ConfigError if it cannot be written."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise full_disk_error(path, e) from None


def write_atomic(path: str, data: bytes):
    """path's new contents, the bytes data, written through replace_file."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    replace_file(path, write)


def append_log(path: str, record: dict):
    """One record more in log.jsonl, by rewriting it through a temporary file (the log is one line per
    evaluation: small), so that a full disk never leaves a half line; the old lines stay as they were."""
    old = b""
    if os.path.exists(path):
        with open(path, "rb") as f:
            old = f.read()
    if old and not old.endswith(b"\n"):  # a line cut short by a crash: the new record starts its own line
        old += b"\n"
    write_atomic(path, old + (json.dumps(record) + "\n").encode())


def trim_log(path: str, last_iter: int):
    """On resume, drop the records written after the checkpoint: those steps will be redone (atomically)."""
    if not os.path.exists(path):  # a fresh run: log.jsonl appears with its first record
        return
    records = [r for r in read_log(path) if r["iter"] <= last_iter]
    kept = "".join(json.dumps(r) + "\n" for r in records).encode()
    with open(path, "rb") as f:
        if f.read() == kept:
            return
    write_atomic(path, kept)


def save_figure(fig, path: str, dpi: int = 110, **kwargs):
    """A figure (plots.py) as a PNG written atomically (replace_file), then closed; one line if the disk is full."""
    try:
        replace_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, **kwargs))
    finally:
        plots.close(fig)


def save_evaluation(out_dir: str, record: dict, state: dict) -> str:
    """An evaluation's record in log.jsonl, the loss plot, and the checkpoint; returns the line to show."""
    log_path = os.path.join(out_dir, "log.jsonl")
    append_log(log_path, record)
    save_figure(plots.losses(read_log(log_path)), os.path.join(out_dir, "loss.png"))
    save_checkpoint(os.path.join(out_dir, "ckpt.pt"), state)
    return (f"iter {record['iter']}: val {record['val_loss']:.4f} | train {record['train_loss_mean']:.4f} "
            f"(mean since the last evaluation), {record['train_loss_last']:.4f} (last step) | "
            f"{record['tok_per_s']:,.0f} tok/s, {record['elapsed_s']:.0f}s")


# ----------------------------------------------------------------------------- processes: DDP and stop signals

def init_distributed(device: str):
    """(ddp, rank, world, device): under torchrun, join the process group (nccl on GPUs, gloo on
    CPUs), each process on its own GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return False, 0, 1, device
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def on_first_rank(fn, ddp: bool, per_machine: bool = False):
    """fn() on rank 0 (or the first rank of each machine) while the others wait; an error there is
    raised on every rank, so all stop together instead of waiting forever. Returns fn's result there."""
    result, error = None, None
    if int(os.environ.get("LOCAL_RANK" if per_machine else "RANK", "0")) == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001  (any error: the other ranks must not hang)
            error = e
    if ddp:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)  # also a barrier: what fn wrote exists after it
        error = next((e for e in errors if e), None)
    if error:
        raise error
    return result


def mean_over_ranks(value: float, world: int, device: str) -> float:
    """The mean of one number over all DDP ranks (itself when there is one process)."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / world


def agree(ddp: bool, device: str, *flags: bool) -> list:
    """Under DDP, OR each flag over all ranks, so that every rank takes the same branch."""
    if not ddp:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t]


def wrap_ddp(model, device: str, skip: list):
    """DistributedDataParallel around the model, leaving out the parameters named in skip (their
    sparse gradients are averaged by the model itself, without densifying them). Buffers are not
    re-broadcast before each forward: the MoE load counters are per rank until update_bias sums
    them, and every other buffer stays equal on all ranks by itself."""
    DDP = torch.nn.parallel.DistributedDataParallel
    DDP._set_params_and_buffers_to_ignore_for_model(model, skip)
    # torch 2.13 renamed broadcast_buffers (now deprecated, with a FutureWarning) to forward_sync_buffers
    no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
               else "broadcast_buffers": False}
    return DDP(model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None, **no_sync)


def finish_distributed(model, check_agreement: bool, skip=()):
    """Leave the process group; after a whole run, first check that every rank holds the same weights
    (but those named in skip, which differ by design: a sharded table's rows)."""
    if check_agreement:
        sums = [None] * dist.get_world_size()
        dist.all_gather_object(sums, torch.stack([p.detach().double().sum() for name, p in model.named_parameters()
                                                  if name not in skip]).cpu())
        if any(not torch.equal(sums[0], s) for s in sums[1:]):
            raise RuntimeError("DDP ranks diverged: their parameters differ after training")
        if dist.get_rank() == 0:
            print(f"ddp: parameters identical on all {len(sums)} ranks")
    dist.destroy_process_group()


class StopRequest:
    """Ctrl-C or SIGTERM (what `timeout` and job schedulers send) asks the loop to stop after the
    current step, so that the checkpoint holds a step boundary and --resume is exact; a second
    signal raises KeyboardInterrupt at once, leaving the last checkpoint as it was. Under torchrun
    one Ctrl-C reaches each worker twice (from the terminal, and forwarded by torchrun), so a repeat
    within two seconds counts as the same request."""

    def __init__(self):
        self.signal, self.when = None, 0.0
        self.previous = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)}

    def request(self, signum, frame):
        if self.signal is not None and time.time() - self.when > 2.0:
            raise KeyboardInterrupt
        self.signal, self.when = self.signal or signum, self.when or time.time()

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Guard:
    """What ends or skips a training step, decided alike on every rank (agree): a non-finite loss or
    gradient stops the run without saving; under fp16 a gradient that overflowed means the loss scale is
    too high, so every optimizer skips the step and GradScaler halves the scale, but MAX_OVERFLOWS in a row
    count as divergence (a real one overflows at any scale); Ctrl-C or SIGTERM (StopRequest, from now on)
    ends the run after this step, saved."""

    MAX_OVERFLOWS = 20  # fp16: from a scale of 2^16, 20 halvings reach 2^-4; overflowing still is divergence

    def __init__(self, ddp: bool, device: str, scaler, ckpt_path: str):
        self.ddp, self.device, self.scaler, self.ckpt_path = ddp, device, scaler, ckpt_path
        self.overflows_in_a_row, self.skipped = 0, 0  # skipped: steps skipped since the last log record
        self.stop = StopRequest()

    @property
    def signal(self):
        return self.stop.signal

    def check(self, it: int, losses: list, grad_norm: float):
        """(skip this step, stop after it, the error line if the run must end now else '')."""
        bad_loss, bad_grad, stopping = agree(self.ddp, self.device, not all(map(math.isfinite, losses)),
                                             not math.isfinite(grad_norm), self.stop.signal is not None)
        overflow = bad_grad and self.scaler.is_enabled() and not bad_loss
        self.overflows_in_a_row = self.overflows_in_a_row + 1 if overflow else 0
        if bad_loss or (bad_grad and not overflow) or self.overflows_in_a_row > self.MAX_OVERFLOWS:
            what = (f"the fp16 gradient overflowed {self.overflows_in_a_row} steps in a row (loss scale now "
                    f"{self.scaler.get_scale():.1e})" if overflow else "loss or gradient became non-finite")
            return overflow, stopping, (f"error: {what} at iter {it} (last loss {losses[-1]}); stopping without "
                                        f"saving. The last good checkpoint, if any, is {self.ckpt_path}. Try a lower "
                                        "--learning_rate" + (" or --dtype=float32." if self.scaler.is_enabled() else "."))
        self.skipped += overflow
        return overflow, stopping, ""

    def log_fields(self) -> dict:
        """fp16: the loss scale now, and the steps skipped since the last record; {} otherwise."""
        if not self.scaler.is_enabled():
            return {}
        fields, self.skipped = {"loss_scale": self.scaler.get_scale(), "skipped_steps": self.skipped}, 0
        return fields

    def close(self):
        self.stop.restore()


class Window:
    """What the log records of the steps since the last evaluation: their losses, their MoE load (each
    layer's max over mean expert load, GPT.update_router_biases) and their tokens per second."""

    def __init__(self):
        self.losses, self.loads, self.tokens, self.t0, self.speed = [], [], 0, time.time(), 0.0

    def add(self, losses: list, load: dict, tokens: int):
        self.losses += losses
        self.last_loss = losses[-1]
        if load:
            self.loads.append({k: v["max_over_mean"] for k, v in load.items()})
        self.tokens += tokens
        self.speed = self.tokens / max(time.time() - self.t0, 1e-9)

    def tok_per_s(self) -> float:
        return self.speed

    def train_fields(self) -> dict:
        return {"train_loss_mean": float(np.mean(self.losses)), "train_loss_last": self.last_loss}

    def load_fields(self) -> dict:
        """The mean over the window's steps of each MoE layer's max/mean expert load; {} without MoE."""
        if not self.loads:
            return {}
        return {"moe_max_over_mean": {str(k): round(float(np.mean([s[k] for s in self.loads])), 3)
                                      for k in self.loads[0]}}


def announce(cfg, model, tok, meta, world, it, dtype):
    """What is about to train, on what data, where and how; the whole config goes to config.json."""
    write_atomic(os.path.join(cfg.out_dir, "config.json"), json.dumps(dataclasses.asdict(cfg), indent=2).encode())
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
    if note := dense_table_note(cfg, counts["engram_tables"]):
        print(note)


def dense_table_note(cfg, n: int) -> str:
    """The line announce prints where cli.fit_to_device made the n table parameters dense: why, and the price."""
    if cfg.device != "mps" or cfg.model.engram.engram_sparse or not cfg.model.engram.engram_layers:
        return ""
    return (f"note: MPS has no sparse tensors, so the Engram tables ({n / 1e6:.1f}M parameters) train densely: every "
            f"step writes a {4 * n / 2**20:,.0f} MB gradient and AdamW moves every row (bench.py --engram_scaling "
            "measures the dense step against the sparse one)")
