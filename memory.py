"""Where Engram's table rows live: the system half of "Conditional Memory via Scalable Lookup".

A resident table is an nn.Embedding on the model's device (engram.py). The paper's point is that the
tables can outgrow one device, because a lookup's row ids depend only on the input tokens:

  1. ShardedTable    training under torchrun: rank k owns rows r with r % world == k, and the SparseAdam
                     state of only those. The rows a batch needs are fetched from their owners with
                     All-to-All, and their gradients go back the same way (paper: tables sharded across
                     GPUs, an All-to-All for the active rows).
  2. OffloadedTable  the rows in host memory ('host', pinned on a GPU) or in a memory-mapped file
                     ('disk'). Since the ids are known before block 0 runs, a background thread hashes and
                     gathers every Engram layer's rows (and, on a GPU, copies them on a side stream) while
                     the blocks in front compute (paper: host offload with prefetch, under 3% overhead).
                     'host' also trains: SparseAdam updates the host rows, and rows it changed after a
                     prefetch began are read again before they are used.

Each table answers lookup(context, layer) -> (B, T, H * head_dim) on the model's device, as a resident one
(engram.Table) does, where layer.rows(context) is the Engram layer's hash (engram.hash_ngrams with that
layer's primes); so Engram.forward does not know where its rows live. Checkpoints
always hold the whole table (unshard_state assembles it on the first rank), so a run saved by 2 ranks
resumes on 1 and the other way round, and sample.py reads it as it reads any run.
"""
import concurrent.futures
import hashlib
import json
import os
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import cli
from cli import ConfigError
from engram import Engram, head_table_sizes, table_params

OFFLOAD_MODES = ("", "host", "disk")  # '' = the table stays resident on the model's device


# ----------------------------------------------------------------------------- 1. sharded across ranks
# Interleaved ownership (row r on rank r % world, at local index r // world) spreads every head, and every
# hot N-gram's neighbours, over all ranks, and makes both directions one line of tensor indexing:
#     shard of rank k  = full[k::world]                           (shard_rows)
#     full             = stack(shards).transpose(0, 1).flatten()  (unshard: full[s*world + k] = shard_k[s])

def shard_rows(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """(n_rows, ...) -> (ceil((n_rows - rank) / world), ...): the rows rank owns, a copy."""
    return full[rank::world].clone()


def requests_by_owner(rows: torch.Tensor, world: int):
    """What one rank asks of each owner. rows (N,) global row ids, repeats allowed ->
    unique (U,) the distinct rows, inverse (N,) with rows = unique[inverse], order (U,) a permutation of
    unique that groups it by owner (rank 0's rows first), counts (world,) how many rows each owner gets."""
    unique, inverse = torch.unique(rows, return_inverse=True)  # a frequent N-gram is fetched once
    owner = unique % world
    order = torch.argsort(owner, stable=True)
    counts = torch.bincount(owner, minlength=world)
    return unique, inverse, order, counts


def exchange(send: torch.Tensor, send_counts: torch.Tensor, recv_counts: torch.Tensor) -> torch.Tensor:
    """All-to-All of rows grouped by destination: send (sum(send_counts), ...) -> (sum(recv_counts), ...)
    grouped by source rank."""
    recv = send.new_empty((int(recv_counts.sum()), *send.shape[1:]))
    dist.all_to_all_single(recv, send.contiguous(), recv_counts.tolist(), send_counts.tolist())
    return recv


class ShardedLookup(torch.autograd.Function):
    """shard (S, D) of this rank, rows (N,) global ids -> (N, D) the rows' values, wherever they live.

    forward:  counts to the owners (All-to-All of one number each), then the ids, then the values back
    backward: the gradient of each fetched row goes back to its owner, which keeps it as a sparse (COO)
              gradient of its shard, divided by world as DDP averages a dense gradient
    Every rank must call it the same number of times (it is a collective), as DDP's backward is."""

    @staticmethod
    def forward(ctx, rows, shard, world):
        unique, inverse, order, counts = requests_by_owner(rows, world)
        recv_counts = exchange(counts, torch.ones_like(counts), torch.ones_like(counts))  # (world,) what each asks
        asked = exchange(unique[order], counts, recv_counts)  # (M,) global ids others want from this rank
        local = asked // world  # their places in this shard
        values = exchange(shard.detach()[local], recv_counts, counts)  # (U, D) in the order asked
        out = torch.empty_like(values)
        out[order] = values  # back in unique's order
        ctx.save_for_backward(inverse, order, local)
        ctx.counts, ctx.recv_counts, ctx.world, ctx.shard_shape = counts, recv_counts, world, shard.shape
        return out[inverse]  # (N, D)

    @staticmethod
    def backward(ctx, grad_out):
        inverse, order, local = ctx.saved_tensors
        grad_unique = grad_out.new_zeros((int(ctx.counts.sum()), grad_out.shape[1]))
        grad_unique.index_add_(0, inverse, grad_out)  # a row used twice here: its gradients summed
        grads = exchange(grad_unique[order], ctx.counts, ctx.recv_counts)  # (M, D) to the owners
        grad_shard = torch.sparse_coo_tensor(local[None], grads / ctx.world, ctx.shard_shape,
                                             check_invariants=False)
        return None, grad_shard, None


class ShardedTable(nn.Module):
    """One Engram layer's table, split over the ranks: weight (ceil((n_rows - rank) / world), D) holds the
    rows this rank owns. Its gradient is sparse, already averaged over the ranks (DDP must skip it)."""

    sparse = True  # trained by SparseAdam, as a sparse resident table is

    def __init__(self, full_weight: torch.Tensor, rank: int, world: int):
        super().__init__()
        self.n_rows, self.rank, self.world = full_weight.shape[0], rank, world
        self.weight = nn.Parameter(shard_rows(full_weight.detach(), rank, world))

    @torch.compiler.disable  # a collective with data-dependent sizes: kept out of torch.compile's graph
    def lookup(self, context, layer):
        rows = layer.rows(context)  # (B, T, H) global row ids
        return ShardedLookup.apply(rows.flatten(), self.weight, self.world).view(*rows.shape[:2], -1)


def unshard(shard: torch.Tensor, n_rows: int, world: int, rank: int):
    """Every rank's shard (S_k, ...) -> the whole (n_rows, ...) on rank 0 (None elsewhere). gloo's gather
    needs equal sizes, so each shard is padded to the largest, ceil(n_rows / world)."""
    most = -(-n_rows // world)
    padded = torch.cat([shard, shard.new_zeros((most - shard.shape[0], *shard.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
    dist.gather(padded, parts, dst=0)
    if rank != 0:
        return None
    return torch.stack(parts).transpose(0, 1).flatten(0, 1)[:n_rows]  # full[s * world + k] = shard_k[s]


def sharded_params(model: nn.Module) -> dict:
    """{parameter name: its ShardedTable} of every sharded table in the model."""
    return {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, ShardedTable)}


def map_table_moments(optimizers, opt_states: list, tables: dict, fn) -> list:
    """opt_states (optimizer.state_dict()s) with fn(moment, table) in place of each sharded table's Adam
    moments (exp_avg, exp_avg_sq: a row per table row; 'step' is shared). New dicts: a state_dict's
    entries are the optimizer's own, which must not change."""
    out = []
    for opt, opt_state in zip(optimizers, opt_states):
        state = dict(opt_state["state"])
        for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):  # state_dict's numbering
            table = next((t for t in tables.values() if t.weight is p), None)
            if table is not None and i in state:
                state[i] = {k: fn(v, table) if torch.is_tensor(v) and v.dim() == 2 else v for k, v in state[i].items()}
        out.append({**opt_state, "state": state})
    return out


def unshard_state(model, optimizers, rank: int):
    """(model state, optimizer states) with every sharded table, and its Adam moments, whole on rank 0: a
    checkpoint like any one-process run's. A collective: every rank calls it; the others get (None, None)."""
    tables = sharded_params(model)
    state = model.state_dict()
    for name, table in tables.items():
        state[name] = unshard(state[name], table.n_rows, table.world, rank)
    opt_states = map_table_moments(optimizers, [opt.state_dict() for opt in optimizers], tables,
                                   lambda v, t: unshard(v, t.n_rows, t.world, rank))
    return (state, opt_states) if rank == 0 else (None, None)


def shard_state(model, optimizers, model_state: dict, opt_states: list):
    """The inverse, on every rank: a whole checkpoint's tables and moments cut to the rows this rank owns."""
    tables = sharded_params(model)
    model_state = {k: shard_rows(v, tables[k].rank, tables[k].world) if k in tables else v
                   for k, v in model_state.items()}
    return model_state, map_table_moments(optimizers, opt_states, tables, lambda v, t: shard_rows(v, t.rank, t.world))


def table_bytes(model, optimizers) -> dict:
    """What this process holds for the Engram tables: their weights and their optimizer state, in bytes."""
    tables = [m.weight for m in model.modules() if isinstance(m, (ShardedTable, OffloadedTable))] + \
        [m.table.weight for m in model.modules() if isinstance(getattr(m, "table", None), nn.Embedding)]
    ids = {id(p) for p in tables}
    optimizer = sum(v.numel() * v.element_size() for opt in optimizers for p, s in opt.state.items()
                    if id(p) in ids for v in s.values() if torch.is_tensor(v))
    return {"table": sum(p.numel() * p.element_size() for p in tables), "optimizer": optimizer}


def agree_found_inf(scaler, optimizers):
    """fp16 with sharded tables: GradScaler decides per rank whether a gradient overflowed, and a shard's
    overflow is seen only by its owner. OR each optimizer's found-inf flags over the ranks, so that every
    rank skips the same steps and keeps the same loss scale. (It reads GradScaler's per-optimizer record,
    which unscale_ fills and step/update read.)"""
    for opt in optimizers:
        for found in scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values():
            dist.all_reduce(found, op=dist.ReduceOp.MAX)


# ----------------------------------------------------------------------------- 2. in host memory or on disk
# The prefetch pipeline of one table (one Engram layer):
#     prefetch(context)   main thread: the ids to the CPU, then a worker thread hashes them and gathers the
#                         rows (from host memory, or from the file's pages), and on a GPU copies them to the
#                         device on a side stream; the main thread goes on with the blocks in front
#     lookup(context)     at the Engram layer: wait for that fetch (or fetch now, if none is pending for
#                         this context), rows a training step changed since it began are read again

class OffloadedTable(nn.Module):
    """One Engram layer's rows outside the model's device. where='host': weight (n_rows, D), a float32
    parameter that stays in host memory whatever .to() asks (pinned when the model is on a GPU), trained
    by SparseAdam; where='disk': file (n_rows, D), a read-only np.memmap of the table file."""

    sparse = True

    def __init__(self, where: str, device, rows):
        # rows: the (n_rows, D) table, a tensor (host; copied into host memory) or an np.memmap (disk)
        super().__init__()
        self.where, self.device, self.n_rows = where, torch.device(device), rows.shape[0]
        if where == "host":
            rows = rows.detach().to("cpu", torch.float32)
            self.weight = nn.Parameter(rows.pin_memory() if self.device.type == "cuda" else rows.clone())
        self.file = rows if where == "disk" else None
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-prefetch")
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.pending = None  # (context on the CPU, future of (ids, values, event))
        self.stale = []  # ids of rows an optimizer step changed while a fetch may have been reading them
        self.fetch_s = self.wait_s = 0.0  # time spent gathering (worker), and waiting for it (main thread)

    def _apply(self, fn, recurse=True):
        return self  # .to(device) moves the rest of the model; these rows stay where they are

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """(...) int64 row ids on the CPU -> (..., D) float32 rows on the CPU, read from host memory or
        from the file (only the pages that hold these rows)."""
        if self.where == "host":
            return self.weight.detach()[ids]
        return torch.from_numpy(self.file[ids.numpy()])

    def _fetch(self, context, layer):  # the worker thread's job; also called inline when nothing is pending
        start = time.perf_counter()
        ids = layer.rows(context)  # (B, T, H) on the CPU
        values, event = self.gather(ids), None
        if self.stream is not None:  # pinned host buffer -> device, on the side stream
            with torch.cuda.stream(self.stream):
                values = values.pin_memory().to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
        self.fetch_s += time.perf_counter() - start
        return ids, values, event

    def prefetch(self, context, layer):
        if self.pending is None:  # one fetch in flight; a forward with other ids fetches for itself
            context = context.cpu()
            self.pending = (context, self.pool.submit(self._fetch, context, layer))

    def mark_updated(self):
        """After an optimizer step: the rows of this step's gradient changed (call before zero_grad)."""
        if self.weight.grad is not None:
            self.stale.append(self.weight.grad.coalesce().indices()[0])

    def take(self, context, layer):
        """(ids (B, T, H) on the CPU, values (B, T, H, D) on the device) for this context."""
        context = context.cpu()
        if self.pending is None or not torch.equal(self.pending[0], context):
            ids, values, event = self._fetch(context, layer)  # not prefetched (an evaluation batch)
        else:
            start = time.perf_counter()
            ids, values, event = self.pending[1].result()
            self.wait_s += time.perf_counter() - start
            self.pending = None
            if self.stale:  # changed since the fetch began: read those rows again, now that the step is done
                changed = torch.isin(ids, torch.cat(self.stale))
                self.stale = []
                if changed.any():
                    values[changed.to(values.device)] = self.gather(ids[changed]).to(self.device)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        return ids, values

    def lookup(self, context, layer):
        ids, values = self.take(context, layer)
        if self.where == "host" and torch.is_grad_enabled() and self.weight.requires_grad:
            values = HostLookup.apply(self.weight, ids, values)
        return values.flatten(-2)  # (B, T, H * head_dim)


class HostLookup(torch.autograd.Function):
    """The prefetched rows as a function of the host table, for its gradient: the same sparse gradient
    (every looked-up id with its gradient row, on the CPU) as F.embedding(sparse=True) gives a resident
    table, so SparseAdam takes the same step."""

    @staticmethod
    def forward(ctx, weight, ids, values):
        ctx.save_for_backward(ids)
        ctx.weight_shape = weight.shape
        return values

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to("cpu", torch.float32)
        return torch.sparse_coo_tensor(ids.reshape(1, -1), grad, ctx.weight_shape, check_invariants=False), None, None


def offloaded_tables(model) -> list:
    return [m for m in model.modules() if isinstance(m, OffloadedTable)]


def prefetch_stats(model) -> dict:
    """Gathering time and the part of it the main thread waited for, summed over the offloaded tables."""
    tables = offloaded_tables(model)
    fetch, wait = sum(t.fetch_s for t in tables), sum(t.wait_s for t in tables)
    return {"fetch_s": fetch, "wait_s": wait, "hidden": 1 - wait / fetch if fetch else None}


# ----------------------------------------------------------------------------- placing a model's tables

def engram_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, Engram)]


def shard_tables(model, rank: int, world: int):
    """Under torchrun: every Engram table keeps only the rows this rank owns (row r on rank r % world)."""
    for layer in engram_layers(model):
        layer.table = ShardedTable(layer.table.weight, rank, world)


def offload_tables(model, where: str, device, rows: dict | None = None):
    """Every Engram table's rows to host memory (where='host') or to memory-mapped files (where='disk'); rows
    {parameter name: (n_rows, head_dim) tensor or np.memmap}, None = the tables as they are. Call before
    .to(device). Block 0 then starts each forward by gathering the rows of every layer (prefetch): the ids
    are known before the blocks run, so the gathering overlaps the blocks in front of the Engram layers."""
    for name, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, Engram)):
        layer.table = OffloadedTable(where, device, layer.table.weight if rows is None else rows[f"{name}.table.weight"])
    layers = engram_layers(model)
    model.blocks[0].register_forward_pre_hook(lambda block, args: prefetch_rows(layers, args[1]))


def prefetch(model, idx):
    """Start gathering the rows of the batch idx (B, T) for every table off the device: train.py does this
    for the next batch while this one's backward runs."""
    prefetch_rows(engram_layers(model), model.compression(idx))


def prefetch_rows(layers, context):
    """Start gathering this context's rows for every layer whose table lives off the device."""
    for layer in layers:
        if isinstance(layer.table, OffloadedTable):
            layer.table.prefetch(context, layer)


def sparse_param_names(model) -> list:
    """Parameters with sparse gradients, which DDP must skip: average_sparse_grads averages the resident ones,
    and a sharded table's gradient arrives averaged (ShardedLookup)."""
    return [f"{name}.table.weight" for name, m in model.named_modules() if isinstance(m, Engram) and m.table.sparse]


def average_sparse_grads(model):
    """DDP for the resident tables' sparse gradients (DDP itself skips them): every rank's touched rows and
    their values are gathered and divided by the world size, as DDP averages a dense gradient. Nothing
    table-sized is formed; all_gather needs equal sizes, hence the pad."""
    for layer in engram_layers(model):
        table = layer.table
        if isinstance(table, (ShardedTable, OffloadedTable)) or not table.sparse or table.weight.grad is None:
            continue
        grad, world = table.weight.grad.coalesce(), dist.get_world_size()
        count = torch.tensor([grad._nnz()], device=grad.device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count)
        pad = int(max(counts)) - grad._nnz()
        rows, values = F.pad(grad._indices()[0], (0, pad)), F.pad(grad._values(), (0, 0, 0, pad))
        all_rows, all_values = [torch.empty_like(rows) for _ in counts], [torch.empty_like(values) for _ in counts]
        dist.all_gather(all_rows, rows)
        dist.all_gather(all_values, values)
        rows = torch.cat([r[:int(n)] for r, n in zip(all_rows, counts)])  # (sum of counts,)
        values = torch.cat([v[:int(n)] for v, n in zip(all_values, counts)]) / world  # (sum of counts, head_dim)
        table.weight.grad = torch.sparse_coo_tensor(rows[None], values, grad.shape, check_invariants=False)


def check_placement(cfg, ddp: bool, world: int, master: bool) -> int:
    """How many shards each table is cut into in this run (world under torchrun with --engram_shard, else 1):
    --engram_shard and --engram_offload checked against the model and the processes (one-line errors), and
    --engram_shard on one process said plainly."""
    engram = cfg.model.engram
    if (cfg.engram_shard or cfg.engram_offload) and not engram.engram_layers:
        flag = "--engram_shard=true" if cfg.engram_shard else f"--engram_offload={cfg.engram_offload}"
        raise ConfigError(f"{flag}: this model has no Engram table (--engram=off); drop the flag")
    if cfg.engram_offload and ddp:
        raise ConfigError("--engram_offload=host trains on one process; under torchrun use --engram_shard=true")
    if cfg.engram_offload and not engram.engram_sparse:
        raise ConfigError("--engram_offload=host needs --engram_sparse=true: host rows are updated by SparseAdam")
    if cfg.engram_shard and not engram.engram_sparse:
        raise ConfigError("--engram_shard=true needs --engram_sparse=true: a shard is updated by SparseAdam")
    if not cfg.engram_shard:
        return 1
    if not ddp:
        if master:
            print("note: --engram_shard=true on one process: the one shard is the whole table (start with torchrun "
                  "--nproc_per_node=N to split it over N ranks)")
        return 1
    smallest = min(min(sizes) for sizes in head_table_sizes(engram))
    if world > smallest:
        raise ConfigError(f"--engram_shard=true over {world} ranks: every rank must own rows of every head, and "
                          f"the smallest head has {smallest} rows; raise --engram_rows_per_head or use fewer ranks")
    return world


def check_tables_fit(engram_cfg, device, shards=1):
    """Engram's tables (fp32 weights, two Adam moments and, without engram_sparse, a dense gradient) must fit
    in memory, 1/shards of them per rank when sharded: fail now with the estimate, not after minutes of work."""
    n = (table_params(engram_cfg) if engram_cfg.engram_layers else 0) // shards
    cli.check_fits(n * 4 * (3 if engram_cfg.engram_sparse else 4), device, f"--engram_rows_per_head="
                   f"{engram_cfg.engram_rows_per_head}: {n / 1e6:,.0f}M table parameters with their Adam state"
                   + (f" on each of {shards} ranks" if shards > 1 else ""))


# ----------------------------------------------------------------------------- the training loop's hooks

class Tables:
    """What train.py's loop does for tables that do not live whole on the device, in one place. Made
    before the model moves to its device: offload='host' keeps the tables in host memory, shards > 1 cuts
    them over the torchrun ranks; with neither, every hook is a no-op but average_grads under DDP."""

    def __init__(self, model, device, offload: str = "", shards: int = 1):
        self.model, self.shards = model, shards
        self.ddp = dist.is_available() and dist.is_initialized()
        if offload:  # every rank drew the whole table first: the same initial weights as one process
            offload_tables(model, offload, device)
        if shards > 1:
            shard_tables(model, dist.get_rank(), shards)
        self.host = [m for m in model.modules() if isinstance(m, OffloadedTable)]
        self.sharded_names = set(sharded_params(model))
        self.sharded = [t.weight for t in sharded_params(model).values()]

    def cut(self, ckpt: dict, optimizers) -> dict:
        """A checkpoint (whole tables) cut to this rank's rows and Adam moments, when sharded."""
        if self.sharded:
            ckpt["model"], ckpt["optimizers"] = shard_state(self.model, optimizers, ckpt["model"], ckpt["optimizers"])
        return ckpt

    def prefetch(self, next_batch):
        """Host tables: start gathering the rows of next_batch() (its ids), while this step's backward runs."""
        if self.host:
            prefetch(self.model, next_batch()[0])

    def average_grads(self):
        if self.ddp:
            average_sparse_grads(self.model)

    def agree_overflow(self, scaler, optimizers):
        if self.sharded and scaler.is_enabled():
            agree_found_inf(scaler, optimizers)

    def after_step(self):
        """The rows SparseAdam just changed in host tables: a prefetch that read them reads them again."""
        for table in self.host:
            table.mark_updated()

    def state(self, optimizers):
        """(model state, optimizer states) for a checkpoint, every table whole (a collective when sharded)."""
        if self.sharded:
            return unshard_state(self.model, optimizers, dist.get_rank())
        return self.model.state_dict(), [o.state_dict() for o in optimizers]

    def log_fields(self, optimizers) -> dict:
        """Under torchrun: each rank's table and optimizer-state bytes (table_bytes), 1/world of the whole when
        sharded; {} on one process."""
        if not self.ddp or not engram_layers(self.model):
            return {}
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, table_bytes(self.model, optimizers))
        return {"engram_bytes_per_rank": per_rank}


# ----------------------------------------------------------------------------- the table file ('disk')
# One file of every Engram layer's float32 rows, end to end, beside the checkpoint, and a small JSON
# manifest: each table's name, rows, width and byte offset, and a fingerprint (a hash of a fixed sample of
# rows) that ties the file to the checkpoint it was written from.

TABLE_FILE, MANIFEST = "engram_tables.bin", "engram_tables.json"


def fingerprint(tables: dict) -> str:
    """A hash of 64 evenly spaced rows (and the last) of each {name: (n_rows, D) table}: cheap to compute
    from a memory-mapped checkpoint or file, different for any other training run."""
    h = hashlib.sha256()
    for name, t in sorted(tables.items()):
        picks = np.unique(np.linspace(0, t.shape[0] - 1, 65).astype(np.int64))
        rows = t[torch.from_numpy(picks)] if torch.is_tensor(t) else torch.from_numpy(np.asarray(t[picks]))
        h.update(name.encode() + rows.to(torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def write_table_file(out_dir: str, tables: dict):
    """tables {name: (n_rows, D) tensor} -> out_dir/engram_tables.bin and its manifest, written through a
    temporary file and renamed, after checking the disk has room (a one-line ConfigError if not)."""
    path = os.path.join(out_dir, TABLE_FILE)
    need = sum(t.numel() * 4 for t in tables.values())
    free = shutil.disk_usage(out_dir).free
    if need > free:
        raise ConfigError(f"--engram_offload=disk: {path} needs {need / 2**30:.2f} GiB and {out_dir} has {free / 2**30:.2f} GiB "
              "free; free some space, or use --engram_offload=host")
    layout, offset = [], 0
    try:
        with open(path + ".tmp", "wb") as f:
            for name, t in tables.items():
                for start in range(0, t.shape[0], 1 << 16):  # in slices: a memory-mapped table is never all read in
                    f.write(t[start:start + (1 << 16)].to(torch.float32).contiguous().numpy().tobytes())
                layout.append({"name": name, "rows": t.shape[0], "dim": t.shape[1], "offset": offset})
                offset += t.numel() * 4
            f.flush()
            os.fsync(f.fileno())  # on the disk before it is named: a crash leaves no half file under the name
        manifest = {"bytes": offset, "dtype": "float32", "tables": layout, "fingerprint": fingerprint(tables)}
        with open(os.path.join(out_dir, MANIFEST + ".tmp"), "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(path + ".tmp", path)
        os.replace(os.path.join(out_dir, MANIFEST + ".tmp"), os.path.join(out_dir, MANIFEST))
    except OSError as e:
        for tmp in (path + ".tmp", os.path.join(out_dir, MANIFEST + ".tmp")):
            if os.path.exists(tmp):
                os.remove(tmp)
        raise ConfigError(f"--engram_offload=disk: could not write {path} ({e.strerror or e}); "
                          "use --engram_offload=host") from None


def open_table_file(out_dir: str, tables: dict) -> dict:
    """The file's tables {name: (n_rows, D) read-only np.memmap}, checked against the checkpoint's tables
    (shapes, the file's size, the fingerprint); a one-line ConfigError for a file that does not match."""
    path, manifest_path = os.path.join(out_dir, TABLE_FILE), os.path.join(out_dir, MANIFEST)
    rebuild = f"delete {path} and {manifest_path}, and the next run writes them again from the checkpoint"
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        layout = {t["name"]: t for t in manifest["tables"]}
        size = os.path.getsize(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--engram_offload=disk: {path} or its manifest cannot be read ({type(e).__name__}); "
                          f"{rebuild}") from None
    if size != manifest["bytes"]:
        raise ConfigError(f"--engram_offload=disk: {path} is {size:,} bytes, its manifest says {manifest['bytes']:,} "
              f"(cut short?); {rebuild}")
    shapes = {name: list(t.shape) for name, t in tables.items()}
    if {name: [t["rows"], t["dim"]] for name, t in layout.items()} != shapes:
        raise ConfigError(f"--engram_offload=disk: {path} holds tables of other shapes than the checkpoint's; {rebuild}")
    files = {name: np.memmap(path, dtype=np.float32, mode="r", offset=layout[name]["offset"],
                             shape=tuple(shapes[name])) for name in tables}
    if fingerprint(files) != fingerprint(tables):
        raise ConfigError(f"--engram_offload=disk: {path} was written from another checkpoint (its rows differ); {rebuild}")
    return files
