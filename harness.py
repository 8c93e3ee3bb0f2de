"""The harness around train.py's loop, so that the loop shows only training: a run's files
(checkpoint, log.jsonl, loss.png, gates.png) and its processes (DDP ranks, stop signals).
sample.py and compare.py read and write the same files through it.
"""
import errno
import inspect
import json
import os
import shutil
import signal
import time

import matplotlib
import numpy as np
import torch
import torch.distributed as dist

from cli import ConfigError

matplotlib.use("Agg")  # plots go to files; no display needed
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


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


def plot_losses(records: list, path: str):
    """Train and validation loss against training tokens, from log.jsonl's records, as a PNG."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    trained = [r for r in records if r.get("train_loss_mean") is not None]
    ax.plot([r["tokens"] for r in trained], [r["train_loss_mean"] for r in trained], ".-",
            label="train (mean over the steps since the previous evaluation)")
    ax.plot([r["tokens"] for r in records], [r["val_loss"] for r in records], "o-", label="validation")
    if len(records) > 2:  # the untrained model's loss (~ln vocab) would flatten the rest of the curve
        ax.set_ylim(top=max(r["val_loss"] for r in records[1:]) + 0.5)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: str, **kwargs):
    """A PNG written atomically (replace_file), closing the figure; one line if the disk is full."""
    try:
        replace_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, **kwargs))
    finally:
        plt.close(fig)


def save_evaluation(out_dir: str, record: dict, state: dict) -> str:
    """An evaluation's record in log.jsonl, the loss plot, and the checkpoint; returns the line to show."""
    log_path = os.path.join(out_dir, "log.jsonl")
    append_log(log_path, record)
    plot_losses(read_log(log_path), os.path.join(out_dir, "loss.png"))
    save_checkpoint(os.path.join(out_dir, "ckpt.pt"), state)
    return (f"iter {record['iter']}: val {record['val_loss']:.4f} | train {record['train_loss_mean']:.4f} "
            f"(mean since the last evaluation), {record['train_loss_last']:.4f} (last step) | "
            f"{record['tok_per_s']:,.0f} tok/s, {record['elapsed_s']:.0f}s")


def plot_gates(gates: dict, pieces: list, png_path: str):
    """sample.py --show_gates: Engram's gate over the tokens as a heatmap, one row per Engram block or
    stream ({row label: (T,) gate values}), each cell labelled with its token, in strips of 32 tokens."""
    matrix = torch.stack(list(gates.values())).numpy()  # (n_layers, T)
    per_row = 32  # tokens per strip, so long stories stay legible
    n_rows = (len(pieces) + per_row - 1) // per_row
    fig, axes = plt.subplots(n_rows, 1, figsize=(16, n_rows * (1.2 * len(gates) + 0.25)), squeeze=False)
    for r, ax in enumerate(axes[:, 0]):
        strip = np.full((len(gates), per_row), np.nan)  # the last strip is padded, so cells keep one width
        values = matrix[:, r * per_row:(r + 1) * per_row]
        strip[:, :values.shape[1]] = values
        im = ax.imshow(strip, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        for j, piece in enumerate(pieces[r * per_row:(r + 1) * per_row]):
            for row in range(len(gates)):  # the token itself, written in its cell
                ax.text(j, row, piece.strip() or repr(piece), rotation=90, ha="center", va="center", fontsize=8,
                        color="black" if values[row, j] > 0.5 else "white")
        ax.set_xticks([])
        ax.set_yticks(range(len(gates)))
        ax.set_yticklabels(list(gates), fontsize=8)
    axes[0, 0].set_title("Engram gate alpha_t per token (bright = memory let in, dark = gated out)")
    fig.colorbar(im, ax=axes[:, 0].tolist(), fraction=0.02)
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    save_figure(fig, png_path, bbox_inches="tight")


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
