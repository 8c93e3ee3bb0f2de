"""The Engram experiment: does conditional memory lower the TinyStories loss, and under which budget?

    python compare.py --quick                       # moe vs moe+engram x 2 seeds: the claim in minutes
    python compare.py --preset=cpu                  # arms moe, moe+engram, iso-params, dense x 3 seeds (~1 h, 2 cores)
    python compare.py --preset=gpu                  # every arm and the allocation sweep (one GPU)
    python compare.py --arms=moe,moe+engram --seeds=1 --max_iters=50
    python compare.py --summarize_only              # rebuild the report from the finished runs

Arms differ only in how parameters are split between FFN experts and memory; the data order,
seeds, evaluation windows and schedule are shared (seed k of every arm trains with --seed=1337+k).
  moe                 the MLA + DeepSeekMoE baseline, no Engram
  moe+engram          the same plus Engram: more total parameters, about the same active ones
  iso-params          fewer routed experts + an Engram table: total AND active parameters within 2% of
                      moe (the paper's Table 1 protocol, Engram-27B against MoE-27B)
  dense               one dense SwiGLU FFN with moe's active parameters: the floor
  engram-nogate, engram-2gram, engram-nocompress: ablations of moe+engram
  engram-layer<k>[-<k>...]  moe+engram's module in other blocks (the paper's placement, §6.2), e.g.
                      engram-layer0, engram-layer1-3 (one module in block 1 and one in block 3)
  smear, value-embeds, additive-2gram  the cheap tricks other small models use instead of a memory (model.Smear:
                      nanochat's gated mix of the previous token's embedding; model.ValueEmbedding: token tables
                      added to the attention values of every other block, the last included, as nanochat;
                      additive 2-gram memory: Engram without its gate, 2-grams only, modded-nanogpt's bigram hash)
  engram+smear, engram+value-embeds  moe+engram with one of those tricks on top
  engram-v41          moe+engram's memory as DeepSeek-V4.1 ships it (2- to 4-grams, 8 heads, no ShortConv)
  moe+mhc, moe+engram+mhc  moe and moe+engram on 4 residual streams (mhc.py, --hc_mult=4); variants
                      -static, -spread, -mhcinit, -v4 and -lr<m> (e.g. moe+mhc-static-lr0.1) change its recipe

Each arm is compared with moe twice, paired by seed: at equal steps (final loss) and at equal wall
time (both loss-vs-seconds curves interpolated at the end time of the shorter run), since small-scale
gains can vanish once a slower step is paid for.

--allocation_sweep (the paper's U-curve in miniature) holds total and active parameters at moe's and
moves part of the sparse budget (moe's routed expert parameters a token does not use) into Engram
tables: E' of moe's E routed experts (top-k) leave the share (E - E') / (E - k) to Engram, so the
shares are steps of 1/(E - k) and each --sweep_shares value is rounded to the nearest one.

--memory_sweep (the paper's §3.2 "infinite memory" regime in miniature) keeps the backbone, steps and
batch fixed and changes only the Engram table: rows per head 2^10 ... 2^20, gated Engram at every size,
plain additive 2-gram memory (no gate: the "bigram hash" of modded-nanogpt and nanochat) at three, and
moe as the zero point. Each run passes over most of the train text once (800 steps), so that rows are
revisited. The distinct 2- and 3-grams of the train text bound what more rows can hold; they are
counted and drawn on memory_scaling.png, with a log-linear fit over the sizes below that bound.
    python compare.py --memory_sweep --source=../shared/tinystories-more      # hours on 2 cores

Every arm/seed is an ordinary train.py run directory, out_dir/<arm>/seed<k> (sample.py works on it).
A rerun skips finished runs and resumes unfinished ones. Any other --key=value goes to every run.
Writes out_dir/results.json (every number), results.md (the tables) and compare.png; with
--allocation_sweep also allocation.png, with --memory_sweep memory_scaling.png.
"""
import dataclasses
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import cli
import data
import harness
import plots
import train
from cli import ConfigError
from data import DataError, Tokenizer, load_or_prepare, load_tokens
from engram import build_canonical_ids, table_params
from model import GPT, GPTConfig, dense_ffn_hidden

# train.py flags shared by every arm, applied on top of train.py's preset of the same name.
PRESETS = {
    # 12 runs (4 arms x 3 seeds) one after another, about an hour on 2 cores: 300 iters x 16 x 128 tokens
    # = 0.61M tokens, ~1.2 epochs of the 0.5M-token excerpt (past ~2 epochs memory tables memorise).
    "cpu": dict(n_layer=4, n_embd=192, n_head=6, block_size=128, batch_size=16, max_iters=300,
                eval_interval=25, eval_iters=10, warmup_iters=30, bias_update_speed=1e-2, moe_inter_dim=96,
                n_routed_experts=8, n_activated_experts=2, n_shared_experts=1),
    # train.py's gpu backbone (8 x 512, 16 experts) on fewer tokens: 400 x 64 x 512 = 13M tokens per run,
    # sized by estimate (not yet timed) for ~40 runs in ~30 min; needs the full TinyStories (the hub
    # download), not the 0.5M-token excerpt. A narrower Engram projection keeps iso-params' active
    # parameters within 2% of moe's (W_K and W_V are active matmul parameters).
    "gpu": dict(max_iters=400, eval_interval=50, eval_iters=20, batch_size=64, block_size=512, warmup_iters=40,
                engram_dim_per_order=128),
}
# --quick: the claim in minutes on a laptop CPU (RESULTS.md, "Does Engram lower the loss?"): 4 runs of the
# cpu preset above at 200 of its 300 steps (0.4M tokens each). Its flags are defaults: any of them given on
# the command line wins.
QUICK = dict(preset="cpu", arms="moe,moe+engram", seeds="2", max_iters="200", out_dir="out-quick")
DEFAULT_ARMS = {
    "cpu": "moe,moe+engram,iso-params,dense",
    "gpu": "moe,moe+engram,iso-params,dense,engram-nogate,engram-2gram,engram-nocompress,engram-layer4",
}
# --memory_sweep: every run the same length, long enough to pass over most of the train text once
# (800 x 16 x 128 = 1.64M tokens, 0.94 epochs of ../shared/tinystories-more); few evaluations, as each
# saves a checkpoint that holds the whole table (1.6 GB at 2^20 rows per head).
MEMORY_SWEEP = dict(max_iters=800, eval_interval=200, warmup_iters=40)
MEMORY_VARIANTS = {"engram": {}, "additive-2gram": {"engram_gate": "false", "ngram_orders": "2"}}
ABLATIONS = {"engram-nogate": {"engram_gate": "false"}, "engram-2gram": {"ngram_orders": "2"},
             "engram-nocompress": {"engram_compress": "false"},
             # Engram as DeepSeek-V4.1 ships it: n-grams 2 to 4, 8 hash heads per order, no ShortConv, its hash
             # multipliers (numpy, seeded 10007 x layer); the same memory width per order as moe+engram
             "engram-v41": {"ngram_orders": "2,3,4", "engram_heads_per_order": "8", "engram_short_conv": "false",
                            "engram_hash": "v41"}}
# mHC (mhc.py): the same models on 4 residual streams, DeepSeek's hc_mult. An mHC arm is moe+mhc or
# moe+engram+mhc, optionally followed by variants, e.g. moe+mhc-spread-lr0.1 (RESULTS.md, "mHC's recipe").
MHC_ARMS = {"moe+mhc": {"engram": "off", "hc_mult": "4"}, "moe+engram+mhc": {"hc_mult": "4"}}
MHC_VARIANTS = {"static": {"hc_dynamic": "false"},  # maps without their token-dependent part (phi)
                "spread": {"hc_init": "spread"},  # unequal write gains: breaks the streams' symmetry (the default)
                "mhcinit": {"hc_init": "mhc"},  # the symmetric init (mhc.HyperConnection)
                # DeepSeek-V4's code as it ships: its init, its Sinkhorn start, eps on the reads, its HyperHead
                "v4": {"hc_init": "v4", "hc_sinkhorn_start": "softmax", "hc_pre_eps": "true", "hc_collapse": "dynamic"}}
MHC_LR = re.compile(r"lr(\d+(?:\.\d+)?)")  # a variant lr<m>: --hc_lr_mult=m
# The cheap tricks: on moe (no Engram), and on moe+engram. value_embed_layers is filled in for the depth (arm_flags).
TRICKS = {"smear": {"engram": "off", "smear": "true"}, "value-embeds": {"engram": "off", "value_embed_layers": None},
          "additive-2gram": {"engram_gate": "false", "ngram_orders": "2"},
          "engram+smear": {"smear": "true"}, "engram+value-embeds": {"value_embed_layers": None}}
PLACEMENT = re.compile(r"engram-layer(\d+(?:-\d+)*)")  # engram-layer1-3: --engram_layers=1,3
ARM_NAMES = ["moe", "moe+engram", "iso-params", "dense", *ABLATIONS, *TRICKS, *MHC_ARMS,
             "moe+mhc-<variant>[-<variant>...] (static, spread, mhcinit, v4, lr<m>)", "engram-layer<k>[-<k>...]"]
TOLERANCE = 0.02  # iso-params and dense must match moe's parameter counts this closely
# flags that define the model (not how it is computed): a resumed run takes them from its checkpoint
MODEL_FLAGS = set(cli.flat_fields(GPTConfig())) | {"engram", "preset"}
TRAIN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")


@dataclass
class CompareConfig:
    out_dir: str = ""                 # runs go to out_dir/<arm>/seed<k>, the report to out_dir; '' = out-compare
                                      # (out-memory with --memory_sweep)
    preset: str = ""                  # 'cpu' | 'gpu'; '' = chosen by device
    device: str = "auto"              # passed to every run
    arms: str = ""                    # comma list; '' = the preset's
    seeds: int = 3                    # runs per arm; seed k trains with --seed=seed+k
    seed: int = 1337                  # seed of run k=0
    iso_share: float = 0.3            # iso-params: share of moe's sparse budget moved into the Engram table
    allocation_sweep: bool = False    # on by default in the gpu preset
    sweep_shares: str = "0,0.17,0.33,0.5,0.67,0.83"  # allocation sweep: shares of the sparse budget given to Engram
    summarize_only: bool = False      # no training: report on the finished runs that exist
    memory_sweep: bool = False        # the memory-scaling experiment: only the Engram table size changes
    memory_log2_rows: str = "10,12,14,16,18,20"  # memory sweep: log2(rows per head) of the gated Engram sizes
    memory_ungated: str = "10,16,20"  # memory sweep: sizes that also run additive 2-gram memory and get memory_seeds
    memory_seeds: int = 2             # memory sweep: seeds of moe and of gated Engram at the memory_ungated sizes
    quick: bool = False               # the few-minute demonstration: moe and moe+engram, 2 seeds, cpu preset, 200 steps

    def __post_init__(self):
        cli.check_numbers(self, seeds=("seed",), at_least_1=("seeds", "memory_seeds"), one_of={"preset": ("", *PRESETS)})
        cli.check_device_name(self.device)
        if self.seed + self.seeds > cli.INT_LIMIT:  # run k trains with --seed=seed+k
            raise ValueError(f"--seed={self.seed} --seeds={self.seeds}: the last run's seed must stay below 2^63")
        if not 0 < self.iso_share < 1:
            raise ValueError(f"--iso_share={self.iso_share}: must be between 0 and 1")
        for arm in arm_list(self):
            if arm not in ARM_NAMES and not PLACEMENT.fullmatch(arm) and mhc_arm(arm) is None:
                raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARM_NAMES)}")
        sweep_shares(self)  # a malformed list fails here too
        sizes, ungated = memory_sizes(self.memory_log2_rows), memory_sizes(self.memory_ungated)
        if not set(ungated) <= set(sizes):
            raise ValueError(f"--memory_ungated={self.memory_ungated} must be among --memory_log2_rows="
                             f"{self.memory_log2_rows}")


class RunFailed(Exception):
    """A train.py run exited with an error; its own output says why."""


# ----------------------------------------------------------------------------- command line

def parse_args(argv):
    """-> (CompareConfig, {train flag: value} passed through to every run). Every flag is checked
    now, train.py's too, so that a typo fails at once and not after an hour of training."""
    cli.exit_with_help_if_asked(argv, __doc__, CompareConfig(), train.TrainConfig(), extra="\n  Any train.py flag is "
                                "passed on to every run; out_dir, preset, device and seed are compare.py's own.")
    own = cli.flat_fields(CompareConfig())
    flags = cli.parse_flags(argv, {**cli.flat_fields(train.TrainConfig()), "engram": str, **own})
    if "resume" in flags:
        raise ConfigError("--resume: compare.py resumes unfinished runs by itself; just rerun it")
    if cli.parse_value("quick", flags.get("quick", "false"), bool):
        flags = {**QUICK, **flags}  # its defaults, under whatever the command line gives
    cfg = cli.apply(CompareConfig(), {k: v for k, v in flags.items() if k in own})
    preset = cfg.preset or ("gpu" if cli.resolve_device(cfg.device).startswith("cuda") else "cpu")
    # the gpu preset runs the allocation sweep unless told not to
    cfg = dataclasses.replace(
        cfg, preset=preset, arms=cfg.arms or ("moe" if cfg.memory_sweep else DEFAULT_ARMS[preset]),
        out_dir=cfg.out_dir or ("out-memory" if cfg.memory_sweep else "out-compare"),
        allocation_sweep=cfg.allocation_sweep or (preset == "gpu" and "allocation_sweep" not in flags))
    return cfg, {k: v for k, v in flags.items() if k not in own}


def mhc_arm(arm):
    """'moe+mhc-spread-lr0.1' -> (its flags, the arm without mHC: 'moe'); None if arm is no mHC arm."""
    base, *variants = arm.split("-")
    if base not in MHC_ARMS:
        return None
    flags = dict(MHC_ARMS[base])
    for v in variants:
        if v in MHC_VARIANTS:
            flags.update(MHC_VARIANTS[v])
        elif lr := MHC_LR.fullmatch(v):
            flags["hc_lr_mult"] = lr[1]
        else:
            return None
    return flags, base.removesuffix("+mhc")


def arm_list(cfg):
    return list(dict.fromkeys(a for a in cfg.arms.replace(" ", "").split(",") if a))  # in order, each once


def memory_sizes(text):
    """'10,12,14' -> [10, 12, 14]: log2 of rows per head."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated integers (log2 of rows per head), not {text!r}") from None


def sweep_shares(cfg):
    try:
        return [float(s) for s in cfg.sweep_shares.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--sweep_shares={cfg.sweep_shares}: expected comma-separated numbers") from None


def to_argv(flags):
    return [f"--{k}={v}" for k, v in flags.items()]


def resolve(flags):
    """The TrainConfig a run with these flags gets (train.py's own defaults, presets and checks)."""
    return cli.train_config(to_argv(flags), train.TrainConfig(), train.PRESETS, train.__doc__,
                            split_tokens=data.split_tokens)


# ----------------------------------------------------------------------------- parameter budgets

def count_params(flags, vocab_size):
    """{'total', 'active', 'engram_tables'} of the model these flags build (GPT.param_counts)."""
    model_cfg = resolve(flags).model
    model_cfg.vocab_size = vocab_size
    return GPT(model_cfg).param_counts()


def relative_gap(a, b):
    return (a - b) / b


def check_match(name, counts, target, kinds=("total", "active"), hint=""):
    """Raise unless these parameter counts are within TOLERANCE of the target's."""
    for kind in kinds:
        gap = relative_gap(counts[kind], target[kind])
        if abs(gap) > TOLERANCE:
            raise ConfigError(f"{name}: {kind} params {counts[kind]:,} differ from moe's {target[kind]:,} by "
                              f"{100 * gap:+.1f}% (more than {100 * TOLERANCE:.0f}%){hint}")


def table_size(engram_cfg, rows_per_head):
    """Engram table parameters for a rows_per_head, from the same deterministic primes the model uses."""
    return table_params(dataclasses.replace(engram_cfg, engram_rows_per_head=rows_per_head))


def routed_experts(flags):
    """(E, k): routed experts and how many of them each token uses."""
    moe_cfg = resolve(flags).model.moe
    return moe_cfg.n_routed_experts, moe_cfg.n_activated_experts


def experts_for_share(share, n_experts, top_k):
    """Routed experts E' that give the Engram table `share` of the sparse budget: shares are steps of 1/(E-k)."""
    return min(n_experts, max(top_k + 1, n_experts - round(share * (n_experts - top_k))))


def memory_swap_flags(base, n_experts, vocab_size, moe_counts):
    """moe with n_experts routed experts, and an Engram table holding the parameters the dropped
    experts held, so total params stay moe's. Each head's table is the next distinct prime >= rows,
    so the table grows monotonically with rows: bisect for the best rows_per_head, then verify."""
    flags = {**base, "engram": "on", "n_routed_experts": str(n_experts)}
    without_table = count_params(flags, vocab_size)
    budget = moe_counts["total"] - (without_table["total"] - without_table["engram_tables"])
    engram_cfg = resolve(flags).model.engram
    if budget <= table_size(engram_cfg, 2):
        raise ConfigError(f"{n_experts} routed experts free no room for an Engram table; use fewer")
    lo, hi = 2, budget // (engram_cfg.engram_dim_per_order // engram_cfg.engram_heads_per_order) + 1
    while hi - lo > 1:  # invariant: table(lo) <= budget < table(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if table_size(engram_cfg, mid) <= budget else (lo, mid)
    closer_hi = table_size(engram_cfg, hi) - budget < budget - table_size(engram_cfg, lo)
    flags["engram_rows_per_head"] = str(hi if closer_hi else lo)
    counts = count_params(flags, vocab_size)
    check_match(f"{n_experts} routed experts + Engram", counts, moe_counts,
                hint="; Engram's W_K and W_V count as active: try a smaller --engram_dim_per_order")
    return flags, counts


def dense_flags(base, vocab_size, moe_counts):
    """A dense SwiGLU FFN whose width gives moe's active params (model.dense_ffn_hidden)."""
    flags = {**base, "engram": "off", "ffn": "dense"}
    model_cfg = dataclasses.replace(resolve(flags).model, vocab_size=vocab_size)
    flags["ffn_hidden"] = str(dense_ffn_hidden(model_cfg, moe_counts["active"]))
    counts = count_params(flags, vocab_size)
    check_match("dense", counts, moe_counts, kinds=("active",))
    return flags, counts


def arm_flags(arm, base, vocab_size, moe_counts, cfg):
    """The train.py flags (on top of base) that define an arm, and its parameter counts."""
    flags = {**base, "engram": "on"}
    if arm == "moe":
        flags["engram"] = "off"
    elif arm == "iso-params":
        E, k = routed_experts(base)
        if E - 1 <= k:
            raise ConfigError(f"iso-params needs n_routed_experts >= n_activated_experts + 2 (got {E}, {k})")
        n_experts = min(E - 1, experts_for_share(cfg.iso_share, E, k))  # at least one expert gives way
        return memory_swap_flags(base, n_experts, vocab_size, moe_counts)
    elif arm == "dense":
        return dense_flags(base, vocab_size, moe_counts)
    elif arm in ABLATIONS:
        flags.update(ABLATIONS[arm])
    elif mhc_arm(arm):
        flags.update(mhc_arm(arm)[0])
    elif arm in TRICKS:
        flags.update(TRICKS[arm])
        if "value_embed_layers" in flags:  # nanochat's rule: every other block, ending at the last
            n_layer = resolve(base).model.n_layer
            flags["value_embed_layers"] = ",".join(str(i) for i in range(n_layer) if i % 2 == (n_layer - 1) % 2)
    elif match := PLACEMENT.fullmatch(arm):
        flags["engram_layers"] = match[1].replace("-", ",")
    return flags, count_params(flags, vocab_size)


# ----------------------------------------------------------------------------- the plan

@dataclass
class Group:
    """One arm or one sweep point: its flags, its counts, and the folder holding its seeds' runs."""
    name: str
    flags: dict
    params: dict
    dir: str
    extra: dict = dataclasses.field(default_factory=dict)
    seeds: int = 0  # runs of this group; 0 = --seeds


def plan(cfg, base, vocab_size):
    """Arms and sweep points. Groups with identical flags share one folder, so e.g. the sweep's share-0
    point reuses the moe runs instead of training them twice."""
    moe_flags, moe_counts = arm_flags("moe", base, vocab_size, None, cfg)
    folder_of = {}

    def group(name, flags, params, folder, seeds=0, **extra):
        key = tuple(sorted(flags.items()))
        return Group(name, flags, params, folder_of.setdefault(key, os.path.join(cfg.out_dir, folder)), extra, seeds)

    # moe first, whatever the order given: it is the reference every other arm is measured against
    arms = [group("moe", moe_flags, moe_counts, "moe", seeds=cfg.memory_seeds if cfg.memory_sweep else 0)] \
        if "moe" in arm_list(cfg) else []
    for arm in arm_list(cfg):
        if arm != "moe":
            arms.append(group(arm, *arm_flags(arm, base, vocab_size, moe_counts, cfg), arm))
    sweep = []
    if cfg.allocation_sweep:
        E, k = routed_experts(base)
        for n_experts in sorted({experts_for_share(s, E, k) for s in sweep_shares(cfg)}, reverse=True):
            share = (E - n_experts) / (E - k)
            flags, counts = (moe_flags, moe_counts) if n_experts == E else \
                memory_swap_flags(base, n_experts, vocab_size, moe_counts)
            sparse = moe_counts["total"] - moe_counts["active"]
            sweep.append(group(f"share{share:.2f}", flags, counts, os.path.join("sweep", f"share{share:.2f}"),
                               share=share, n_routed_experts=n_experts,
                               table_share=counts["engram_tables"] / sparse))
    memory = []
    for log2 in memory_sizes(cfg.memory_log2_rows) if cfg.memory_sweep else []:
        for variant, own in MEMORY_VARIANTS.items():
            paired = log2 in memory_sizes(cfg.memory_ungated)  # the sizes both variants run at
            if variant != "engram" and not paired:
                continue
            flags = {**base, "engram": "on", "engram_rows_per_head": str(2 ** log2), **own}
            memory.append(group(f"{variant} 2^{log2}", flags, count_params(flags, vocab_size),
                                os.path.join("memory", variant, f"rows2^{log2}"),
                                seeds=cfg.memory_seeds if variant == "engram" and paired else 1,
                                variant=variant, log2_rows=log2))
    for g in arms + sweep + memory:
        describe(g, base, moe_counts)
    return arms, sweep, memory, moe_counts


def describe(g, base, moe_counts):
    """One line per arm: its parameter counts against moe's, and the flags that make it differ."""
    counts = [f"{kind} {g.params[kind] / 1e6:6.2f}M ({100 * relative_gap(g.params[kind], moe_counts[kind]):+5.1f}%)"
              for kind in ("total", "active")]
    own = {k: v for k, v in g.flags.items() if base.get(k) != v}
    print(f"{g.name:<18} {'  '.join(counts)}  tables {g.params['engram_tables'] / 1e6:5.2f}M  {' '.join(to_argv(own))}")


# ----------------------------------------------------------------------------- running

def read_log(run_dir):
    return harness.read_log(os.path.join(run_dir, "log.jsonl"))


def run_state(run_dir, flags, vocab_size):
    """'done', 'resume' or 'fresh'. A folder holding a different model is an error, not a silent resume."""
    if not os.path.exists(os.path.join(run_dir, "ckpt.pt")):
        return "fresh"
    cfg = resolve(flags)
    saved = harness.load_checkpoint(os.path.join(run_dir, "ckpt.pt"))["config"]
    model = dataclasses.asdict(dataclasses.replace(cfg.model, vocab_size=vocab_size))
    if json.dumps(saved["model"]) != json.dumps(model) or saved["seed"] != cfg.seed:  # JSON: tuples == lists
        raise ConfigError(f"{run_dir} holds a run of another configuration; delete it or pick another --out_dir")
    log = read_log(run_dir)
    return "done" if log and log[-1]["iter"] >= cfg.max_iters else "resume"


def seed_run(g, k, cfg):
    """Run dir and flags of seed k: every arm trains seed k with the same seed, so the same batches."""
    run_dir = os.path.join(g.dir, f"seed{k}")
    return run_dir, {**g.flags, "out_dir": run_dir, "seed": str(cfg.seed + k)}


def runs_of(groups, cfg):
    """(label, run dir, run flags) for every group and seed, each folder once."""
    runs, seen = [], set()
    for g in groups:
        for k in range(g.seeds or cfg.seeds):
            run_dir, flags = seed_run(g, k, cfg)
            if run_dir not in seen:
                seen.add(run_dir)
                runs.append((f"arm={g.name} seed={k}", run_dir, flags))
    return runs


def clock(seconds):
    return f"{seconds:.0f}s" if seconds < 90 else f"{seconds / 60:.0f}m"


def train_all(runs, vocab_size):
    """Run train.py once per arm/seed, one after another (they would only fight over the cores)."""
    t0, durations = time.time(), []
    states = [run_state(run_dir, flags, vocab_size) for _, run_dir, flags in runs]
    left = states.count("fresh") + states.count("resume")
    for i, ((label, run_dir, flags), state) in enumerate(zip(runs, states), 1):
        if state == "done":
            print(f"[{i}/{len(runs)}] {label} | finished, skipped", flush=True)
            continue
        eta = f"~{clock(np.mean(durations) * left)} left" if durations else "time left known after the first run"
        print(f"[{i}/{len(runs)}] {label} | elapsed {clock(time.time() - t0)} | {eta}", flush=True)
        argv = to_argv(flags) + ["--overwrite=true"]  # no checkpoint: whatever is there is a run cut short
        if state == "resume":  # the model comes from the run's checkpoint; only how it trains is passed on
            argv = to_argv({k: v for k, v in flags.items() if k not in MODEL_FLAGS}) + ["--resume"]
        start, child = time.time(), subprocess.Popen([sys.executable, TRAIN_PY, *argv])
        try:
            returncode = child.wait()
        except KeyboardInterrupt:
            child.wait()  # the run got the same Ctrl-C and is saving its checkpoint: let it finish
            raise
        if returncode != 0:
            raise RunFailed(f"train.py failed for {label} in {run_dir} (its output is above); rerun to resume")
        durations.append(time.time() - start)
        left -= 1


# ----------------------------------------------------------------------------- statistics

def mean_std(values):
    """Mean and sample standard deviation (0 for a single value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def loss_at_time(curve, seconds):
    """Validation loss at `seconds` of wall time, linear between evaluations (iter 0 sits at 0 s)."""
    return float(np.interp(seconds, curve["elapsed_s"], curve["val_loss"]))


def equal_time_difference(curve, baseline):
    """Loss difference at the wall time both runs reached: t* = the earlier of their two end times."""
    t = min(curve["elapsed_s"][-1], baseline["elapsed_s"][-1])
    return loss_at_time(curve, t) - loss_at_time(baseline, t)


def summarize_group(g, cfg, vocab_size):
    """Per-seed numbers of a group's finished runs, and their means."""
    seeds = {}
    for k in range(g.seeds or cfg.seeds):
        run_dir, flags = seed_run(g, k, cfg)
        if run_state(run_dir, flags, vocab_size) != "done":
            continue  # unfinished runs would compare different step counts
        log = read_log(run_dir)
        curve = {key: [r[key] for r in log] for key in ("iter", "tokens", "elapsed_s", "val_loss")}
        seeds[str(cfg.seed + k)] = {"dir": run_dir, "final_val_loss": log[-1]["val_loss"], "tokens": log[-1]["tokens"],
                                    "final_val_bpb": log[-1].get("val_bpb"),  # None in a run logged before bpb
                                    "tok_per_s": float(np.mean([r["tok_per_s"] for r in log if r["iter"] > 0])),
                                    "wall_s": log[-1]["elapsed_s"], "curve": curve,
                                    "hc_amax_gain": log[-1].get("hc_amax_gain"),
                                    "hc_stream_diversity": log[-1].get("hc_stream_diversity")}
    out = {"dir": g.dir, "flags": g.flags, "params": g.params, **g.extra, "seeds": seeds}
    if seeds:
        out["final_val_loss"] = dict(zip(("mean", "std"), mean_std([s["final_val_loss"] for s in seeds.values()])))
        out["tok_per_s"] = float(np.mean([s["tok_per_s"] for s in seeds.values()]))
        out["wall_s"] = float(np.mean([s["wall_s"] for s in seeds.values()]))
    return out


def versus_moe(arm, moe):
    """Paired by seed (same data order and init stream): differences to moe at equal steps and equal time."""
    common = [s for s in arm["seeds"] if s in moe["seeds"]]
    if not common:
        return None
    steps = [arm["seeds"][s]["final_val_loss"] - moe["seeds"][s]["final_val_loss"] for s in common]
    times = [equal_time_difference(arm["seeds"][s]["curve"], moe["seeds"][s]["curve"]) for s in common]
    out = {"equal_steps": paired_stat(steps, common), "equal_time": paired_stat(times, common)}
    bpb = [(arm["seeds"][s]["final_val_bpb"], moe["seeds"][s]["final_val_bpb"]) for s in common]
    if all(a is not None and b is not None for a, b in bpb):  # bits per byte: the same gap, vocabulary-free
        out["equal_steps_bpb"] = paired_stat([a - b for a, b in bpb], common)
    return out


def paired_stat(differences, seeds):
    mean, std = mean_std(differences)
    return {"mean": mean, "std": std, "per_seed": dict(zip(seeds, differences))}


def engram_verdict(arms):
    """The issue's test: moe+engram below moe at equal steps by more than twice the larger seed std."""
    moe, eng = arms.get("moe", {}), arms.get("moe+engram", {})
    if "final_val_loss" not in moe or "final_val_loss" not in eng:
        return None
    gap = moe["final_val_loss"]["mean"] - eng["final_val_loss"]["mean"]
    bar = 2 * max(moe["final_val_loss"]["std"], eng["final_val_loss"]["std"])
    return {"moe_minus_engram": gap, "two_max_std": bar, "passed": gap > bar, "n_seeds": len(eng["seeds"])}


def hardware(cfg):
    device = cli.resolve_device(cfg.device)
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else None
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__, "gpu": gpu}


# ----------------------------------------------------------------------------- outputs

def fmt_stat(stat, digits=4):
    return "—" if stat is None else f"{stat['mean']:+.{digits}f} ± {stat['std']:.{digits}f}"


def params_cells(g):
    return f"{g['params']['total'] / 1e6:.2f}M", f"{g['params']['active'] / 1e6:.2f}M"


def loss_cells(g):
    if "final_val_loss" not in g:
        return "no finished run", "—"
    per_seed = " / ".join(f"{s['final_val_loss']:.4f}" for s in g["seeds"].values())
    return f"{g['final_val_loss']['mean']:.4f} ± {g['final_val_loss']['std']:.4f}", per_seed


def write_markdown(results, path):
    lines = ["| arm | total params | active params | val loss (mean ± std) | per seed | Δ vs moe, equal steps "
             "| Δ bits per byte, equal steps | Δ vs moe, equal wall time | tok/s | wall time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in results["arms"].items():
        vs = a.get("vs_moe") or {}
        speed = (f"{a['tok_per_s']:,.0f}", clock(a["wall_s"])) if a["seeds"] else ("—", "—")
        deltas = fmt_stat(vs.get("equal_steps")), fmt_stat(vs.get("equal_steps_bpb")), fmt_stat(vs.get("equal_time"))
        lines.append("| " + " | ".join([name, *params_cells(a), *loss_cells(a), *deltas, *speed]) + " |")
    verdict = results["engram_verdict"]
    if verdict:
        lines += ["", f"moe+engram is {'' if verdict['passed'] else 'NOT '}below moe at equal steps by more than twice "
                      f"the larger seed std: moe − moe+engram = {verdict['moe_minus_engram']:+.4f}, "
                      f"2 × max std = {verdict['two_max_std']:.4f} ({verdict['n_seeds']} seed(s))."]
    against = [(name, a["vs_engram"]) for name, a in results["arms"].items() if a.get("vs_engram")]
    if against:
        lines += ["", "Against moe+engram, paired by seed (negative: the arm is lower):", "",
                  "| arm | Δ vs moe+engram, equal steps | Δ bits per byte, equal steps | Δ vs moe+engram, equal wall time |",
                  "|---|---|---|---|"]
        lines += [f"| {name} | {fmt_stat(vs['equal_steps'])} | {fmt_stat(vs.get('equal_steps_bpb'))} | "
                  f"{fmt_stat(vs['equal_time'])} |" for name, vs in against]
    for name, a in results["arms"].items():
        if (vs := a.get("vs_one_stream")) and "equal_steps" in vs:
            gains = [s["hc_amax_gain"]["max"] for s in a["seeds"].values() if s.get("hc_amax_gain")]
            spread = [np.mean(list(s["hc_stream_diversity"].values())) for s in a["seeds"].values()
                      if s.get("hc_stream_diversity")]
            lines += ["", f"{name} − {vs['arm']} (4 residual streams against 1, paired by seed): "
                          f"{fmt_stat(vs['equal_steps'])} at equal steps, {fmt_stat(vs['equal_time'])} at equal "
                          f"wall time" + (f"; composite H_res Amax gain at the end {max(gains):.4f} (max over "
                                          "tokens and seeds)" if gains else "")
                      + (f"; stream diversity at the end {np.mean(spread):.4f} (mean over blocks and seeds)"
                         if spread else "") + "."]
    if results["sweep"]:
        lines += ["", "Allocation sweep (total and active params held at moe's):", "",
                  "| share to Engram | routed experts | table / sparse budget | total params | active params "
                  "| val loss (mean ± std) | per seed |", "|---|---|---|---|---|---|---|"]
        for p in results["sweep"]:
            cells = [f"{p['share']:.2f}", str(p["n_routed_experts"]), f"{p['table_share']:.2f}", *params_cells(p),
                     *loss_cells(p)]
            lines.append("| " + " | ".join(cells) + " |")
    if results["memory"]:
        lines += memory_markdown(results["memory"], results["arms"].get("moe"))
    hw = results["hardware"]
    lines += ["", f"Command: `{results['command']}` · {results['date']} · {hw['platform']}, {hw['cpu_count']} CPUs, "
                  f"torch {hw['torch']}{', ' + hw['gpu'] if hw['gpu'] else ''} · epochs per run: "
                  + (f"{results['epochs']:.2f}" if results["epochs"] else "—")
                  + f" ({results['train_tokens']:,} train tokens)"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def memory_markdown(memory, moe):
    """The memory sweep's table, the n-gram bound and the fitted slopes, as markdown lines."""
    lines = ["", "Memory sweep (backbone, steps and batch fixed; only the Engram table changes):", "",
             "| memory | rows per head | table params | total params | val loss (mean ± std) | per seed | tok/s "
             "| step time |", "|---|---|---|---|---|---|---|---|"]
    if moe and moe["seeds"]:
        lines.append(f"| none (moe) | — | 0 | {moe['params']['total'] / 1e6:.2f}M | {' | '.join(loss_cells(moe))} "
                     f"| {moe['tok_per_s']:,.0f} | {1000 * memory['tokens_per_step'] / moe['tok_per_s']:.0f} ms |")
    for r in memory["rows"]:
        speed = (f"{r['tok_per_s']:,.0f}", f"{r['step_ms']:.0f} ms") if r["seeds"] else ("—", "—")
        lines.append(f"| {r['variant']} | 2^{r['log2_rows']} | {r['table_params'] / 1e6:.2f}M | "
                     f"{r['params']['total'] / 1e6:.2f}M | {' | '.join(loss_cells(r))} | {' | '.join(speed)} |")
    bound = memory["distinct_ngrams"]
    lines += ["", f"Distinct n-grams of canonical ids in the train split: {bound[2]:,} 2-grams, {bound[3]:,} 3-grams."]
    for variant, fit in memory["fits"].items():
        lines.append(f"Fit over {variant} sizes 2^{', 2^'.join(map(str, fit['log2_rows']))} (rows per head below the "
                     f"distinct 2-grams): {fit['slope_per_doubling']:+.4f} val loss per doubling of table params.")
    return lines


def distinct_ngrams(meta, data_cfg, model_cfg):
    """{2: n, 3: n}: distinct 2- and 3-grams of canonical ids (after Engram's tokenizer compression) in
    the train split. A head with more rows than its order has distinct N-grams cannot store more:
    past that size the rows are spare, and the loss curve must flatten."""
    tok = Tokenizer.from_meta(meta)
    canonical = build_canonical_ids(tok.token_bytes()).numpy() if model_cfg.engram.engram_compress \
        else np.arange(tok.vocab_size)
    ids = canonical[np.asarray(load_tokens(data_cfg.data_dir, "train", meta), dtype=np.int64)]
    V = int(canonical.max()) + 1
    key2 = ids[:-1] * V + ids[1:]  # (N-1,) one integer per 2-gram
    key3 = key2[:-1] * V + ids[2:]  # (N-2,) V**3 < 2**63 for any vocabulary this project makes
    return {2: len(np.unique(key2)), 3: len(np.unique(key3))}


def memory_results(memory, cfg, vocab_size, meta, base):
    """The sweep's rows (size, params, loss, speed), the n-gram bound, and a log-linear fit of the
    loss over the sizes below it: loss = a + slope * log2(table params), slope per doubling of memory."""
    train_cfg = resolve(base)
    tokens_per_step = train_cfg.batch_size * train_cfg.model.block_size * train_cfg.gradient_accumulation_steps
    bound = distinct_ngrams(meta, train_cfg.data, train_cfg.model)
    rows = []
    for g in memory:
        r = summarize_group(g, cfg, vocab_size)
        r["rows_per_head"], r["table_params"] = 2 ** g.extra["log2_rows"], g.params["engram_tables"]
        if r["seeds"]:
            r["step_ms"] = 1000 * tokens_per_step / r["tok_per_s"]
        rows.append(r)
    fits = {}
    for variant in MEMORY_VARIANTS:
        # below the bound: rows per head under the distinct 2-grams (the 2-gram heads still collide)
        points = [r for r in rows if r["variant"] == variant and "final_val_loss" in r
                  and r["rows_per_head"] < bound[2]]
        if len(points) >= 2:
            x = np.log2([r["table_params"] for r in points])
            slope, intercept = np.polyfit(x, [r["final_val_loss"]["mean"] for r in points], 1)
            fits[variant] = {"slope_per_doubling": float(slope), "intercept": float(intercept),
                             "log2_rows": [r["log2_rows"] for r in points]}
    return {"rows": rows, "distinct_ngrams": bound, "fits": fits, "tokens_per_step": tokens_per_step}


def report(cfg, argv, arms, sweep, memory, meta, base):
    """Collect every number into results.json, then write results.md and the plots from it."""
    vocab_size = meta["vocab_size"]
    arm_results = {g.name: summarize_group(g, cfg, vocab_size) for g in arms}
    if "moe" in arm_results:
        for name, a in arm_results.items():
            if name != "moe":
                a["vs_moe"] = versus_moe(a, arm_results["moe"])
    if "moe+engram" in arm_results:  # the skeptic's question: does an arm beat Engram itself?
        for name, a in arm_results.items():
            if name not in ("moe", "moe+engram") and mhc_arm(name) is None:
                a["vs_engram"] = versus_moe(a, arm_results["moe+engram"])
    for name in arm_results:  # mHC's own effect: each mHC arm against the same arm on one stream
        without = (mhc_arm(name) or (None, None))[1]
        if without in arm_results:
            arm_results[name]["vs_one_stream"] = {"arm": without, **(versus_moe(arm_results[name], arm_results[without]) or {})}
    finals = [s["tokens"] for a in arm_results.values() for s in a["seeds"].values()]
    # the command that trains these runs (a --summarize_only rerun writes the same file), dated by its last run
    logs = [os.path.join(s["dir"], "log.jsonl") for a in arm_results.values() for s in a["seeds"].values()]
    finished = max((os.path.getmtime(p) for p in logs if os.path.exists(p)), default=time.time())
    results = {"command": " ".join(["python compare.py", *map(shlex.quote, (a for a in argv if not
                                                                             a.startswith("--summarize_only")))]),
               "date": time.strftime("%Y-%m-%d %H:%M %Z", time.gmtime(finished)).replace("GMT", "UTC"),
               "hardware": hardware(cfg), "preset": cfg.preset,
               "train_tokens": meta["train_tokens"], "epochs": max(finals) / meta["train_tokens"] if finals else None,
               "arms": arm_results, "engram_verdict": engram_verdict(arm_results),
               "sweep": [summarize_group(g, cfg, vocab_size) for g in sweep],
               "memory": memory_results(memory, cfg, vocab_size, meta, base) if memory else None}
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_markdown(results, os.path.join(cfg.out_dir, "results.md"))
    harness.save_figure(plots.curves(results), os.path.join(cfg.out_dir, "compare.png"), dpi=120)
    if results["sweep"]:
        harness.save_figure(plots.allocation(results), os.path.join(cfg.out_dir, "allocation.png"), dpi=120)
    if results["memory"]:
        harness.save_figure(plots.memory_scaling(results, MEMORY_VARIANTS), os.path.join(cfg.out_dir,
                                                                                        "memory_scaling.png"), dpi=120)
    with open(os.path.join(cfg.out_dir, "results.md")) as f:
        print(f.read())


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, passthrough = parse_args(argv)
        # every run: train.py's preset, then this file's preset on top, then the user's flags
        own = {**PRESETS[cfg.preset], **(MEMORY_SWEEP if cfg.memory_sweep else {})}
        base = {"preset": cfg.preset, "device": cfg.device, **{k: str(v) for k, v in own.items()}, **passthrough}
        meta = load_or_prepare(resolve(base).data)  # once here, so the runs reuse it; the vocab sizes the models
        arms, sweep, memory, _ = plan(cfg, base, meta["vocab_size"])
        if not cfg.summarize_only:
            train_all(runs_of(arms + sweep + memory, cfg), meta["vocab_size"])
        report(cfg, argv, arms, sweep, memory, meta, base)
    except (ConfigError, DataError, RunFailed) as e:
        cli.fail(e, 1 if isinstance(e, RunFailed) else 2)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
