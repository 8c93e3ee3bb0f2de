"""What Engram does inside a trained model: the paper's analyses (arXiv 2601.07372) on finished runs.

    python analyze.py --runs=out-compare/moe+engram/seed0,out-compare/moe/seed0
    python analyze.py --runs=out                          # the Engram run alone (no LogitLens twin, no CKA)
    python analyze.py --runs=A,B --windows=0 --out_dir=report   # the whole val split; the files into report/

--runs names the Engram run first, then, optionally, its twin trained with --engram=off on the same data.
Both are scored on the same tokens: --windows windows of block_size tokens, one after another from the
start of the val split of the Engram run's data, each scored from the first position whose longest
n-gram lies inside it. Every number comes from the models' own forward passes:

  knockout    (§6.3)   loss and top-1 accuracy with every Engram layer's output removed, and each one's
                       alone, by token class (stock n-gram continuations, in-context repeats, other)
  LogitLens   (§6.1.1) KL(final prediction || the prediction read off each block), both models
  CKA         (§6.1.2) linear CKA between every block of the two models, and the soft alignment index
  frequency            loss of both models and Engram's gate, by how often the looked-up n-gram occurred in train
  gates       (§6.5)   the n-grams whose gate is most open and most closed
  access      (§2.5)   how skewed the table's row lookups are: the hottest rows' share and an LRU cache's hits

Writes analysis.md (tables, each beside the paper's finding), analysis.json (every number),
analysis_logit_lens.png and analysis_cka.png into the Engram run's folder, or --out_dir.
"""
import json
import math
import os
import sys
import time
from collections import OrderedDict, defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import matplotlib
matplotlib.use("Agg")  # figures go to files; no display needed
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from tqdm import tqdm  # noqa: E402

import cli  # noqa: E402
import harness  # noqa: E402
import kernels  # noqa: E402
from data import DataError, load_meta, load_tokens, rebuild_command  # noqa: E402


@dataclass
class AnalyzeConfig:
    runs: str = ""                  # ENGRAM_RUN[,TWIN_RUN]: the Engram run's folder, then its --engram=off twin's
    out_dir: str = ""               # where analysis.md, analysis.json and the figures go; '' = the Engram run's folder
    data_dir: str = ""              # prepared data (meta.json, train.bin, val.bin); '' = the Engram run's own
    windows: int = 256              # val windows of block_size tokens, from the split's start; 0 = the whole split
    batch_size: int = 16            # windows per forward pass
    train_tokens: int = 20_000_000  # n-grams are counted over the first N train tokens; 0 = all of them
    stock_min_count: int = 5        # stock: the target follows its two tokens most often in train, this often at least
    gate_min_count: int = 5         # n-grams scored fewer times than this are left out of the gate ranking
    gate_top: int = 15              # n-grams listed at each end of the gate ranking
    cka_batch: int = 1024           # tokens per CKA minibatch (the unbiased HSIC is summed over minibatches)
    cka_top_k: int = 0              # columns the soft alignment index averages over; 0 = ceil(twin's depth / 4)
    device: str = "auto"            # 'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps'
    kernels: str = "auto"           # 'auto' | 'triton' | 'torch' (see kernels.py)

    def __post_init__(self):
        cli.check_numbers(self, nonneg=("windows", "train_tokens", "cka_top_k"))
        for name in ("batch_size", "stock_min_count", "gate_min_count", "gate_top"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)}: must be at least 1")
        if self.cka_batch < 4:
            raise ValueError(f"--cka_batch={self.cka_batch}: must be at least 4 (the unbiased HSIC divides by n - 3)")
        if self.kernels not in kernels.MODES:
            raise ValueError(f"--kernels={self.kernels}: expected one of {', '.join(kernels.MODES)}")


CLASSES = ("stock", "in-context", "other")  # token classes, codes 0, 1, 2
BUCKETS = ("unseen", "1-9", "10-99", "100-999", "1000+")  # train counts of the looked-up n-gram, codes 0..4
EDGES = [1, 10, 100, 1000]  # np.digitize's edges between those buckets
HOT = (0.01, 0.10, 0.50)  # row-access skew: the hottest 1, 10 and 50% of a head's rows
PAPER = {  # the paper's findings, quoted beside ours
    "knockout": "factual-knowledge tasks keep only 29-44% of their score (TriviaQA 29%); reading comprehension "
                "keeps 81-93% (C3 93%)",
    "lens": "the KL is systematically smaller with Engram, most in the early layers",
    "cka": "Engram-27B's layer 5 aligns with about layer 12 of MoE-27B: a_j - j > 0, Engram's layers act deeper",
}


# ----------------------------------------------------------------------------- runs and data

@dataclass
class Run:
    path: str
    config: dict  # the checkpoint's TrainConfig, as a dict
    meta: dict    # the checkpoint's data meta
    model: torch.nn.Module = None
    tok: object = None


def engram_layers_of(run: Run) -> list:
    return list(run.config.get("model", {}).get("engram", {}).get("engram_layers") or [])


def open_runs(cfg: AnalyzeConfig, device) -> tuple[Run, Run | None]:
    """The Engram run and its twin (or None), checked against each other before any model is built."""
    paths = [p for p in cfg.runs.split(",") if p]
    if not 1 <= len(paths) <= 2:
        raise cli.ConfigError(f"--runs={cfg.runs}: give the Engram run's folder, then optionally its twin's: "
                              "--runs=ENGRAM_RUN[,TWIN_RUN]")
    runs = []
    for path in paths:
        ckpt = harness.load_checkpoint(os.path.join(path, "ckpt.pt"))
        runs.append(Run(path, ckpt["config"], ckpt["meta"]))
    eng, twin = runs[0], (runs[1] if len(runs) == 2 else None)
    if not engram_layers_of(eng):
        raise cli.ConfigError(f"{eng.path} has no Engram layer (trained with --engram=off); name the Engram run "
                              "first: --runs=ENGRAM_RUN[,TWIN_RUN]")
    if twin is not None:
        if engram_layers_of(twin):
            raise cli.ConfigError(f"{twin.path} has Engram layers too; the second run must be the twin trained "
                                  "with --engram=off")
        vocab = lambda run: (run.meta.get("gpt2_ids"), run.meta.get("vocab_size"))  # noqa: E731
        if vocab(twin) != vocab(eng):
            raise cli.ConfigError(f"{twin.path} has another tokenizer or vocabulary than {eng.path} "
                                  f"({twin.meta.get('vocab_size')} ids against {eng.meta.get('vocab_size')}); "
                                  "a twin must be trained on the same prepared data")
    for run in runs:
        run.model, run.tok = harness.load_run(run.path, device)
    return eng, twin


SAME_DATA = ("vocab", "vocab_size", "gpt2_ids", "max_train_mb", "train_tokens", "val_tokens")  # the same tokens


def open_data(cfg: AnalyzeConfig, eng: Run):
    """(train tokens, val tokens, data_dir) of the data the Engram run trained on, checked against its meta."""
    data_dir = cfg.data_dir or eng.config.get("data", {}).get("data_dir", "")
    if not data_dir or not os.path.isdir(data_dir):
        raise cli.ConfigError(f"the data {eng.path} trained on ({data_dir}) is not there; prepare it again with "
                              f"{rebuild_command(data_dir, eng.meta)}, or give --data_dir")
    meta = load_meta(data_dir)
    if differ := [k for k in SAME_DATA if meta.get(k) != eng.meta.get(k)]:
        raise cli.ConfigError(f"{data_dir} is not the data {eng.path} trained on ({', '.join(differ)} differ); "
                              f"rebuild it with {rebuild_command(data_dir, eng.meta)}, or give --data_dir")
    train, val = (load_tokens(data_dir, split, meta) for split in ("train", "val"))
    if cfg.train_tokens:
        train = train[:cfg.train_tokens]
    return np.asarray(train, dtype=np.int64), val, data_dir


def window_starts(n_tokens: int, T: int, windows: int) -> np.ndarray:
    """Starts of consecutive, non-overlapping windows of T + 1 tokens (inputs and targets) from the split's
    start: their scored positions, in order, are the split's text in order."""
    n = (n_tokens - 1) // T if windows == 0 else min(windows, (n_tokens - 1) // T)
    if n < 1:
        raise cli.ConfigError(f"the val split has {n_tokens} tokens, too few for one window of {T + 1}")
    return np.arange(n) * T


# ----------------------------------------------------------------------------- token classes, from the text alone

def ngram_keys(ids, n: int, base: int) -> np.ndarray:
    """(..., L) ids < base -> (..., L - n + 1) int64: one number per n-gram, ids[k..k+n-1] in base `base`
    (exact: distinct n-grams get distinct keys). Entry k is the n-gram that ends at position k + n - 1."""
    if base ** n >= 2 ** 63:
        raise cli.ConfigError(f"{n}-grams of {base:,} ids do not fit one int64 key; the analysis counts n-grams "
                              "of at most that size")
    ids = np.asarray(ids, dtype=np.int64)
    L = ids.shape[-1]
    keys = np.zeros(ids.shape[:-1] + (max(L - n + 1, 0),), dtype=np.int64)
    for j in range(n):
        keys = keys * base + ids[..., j:L - n + 1 + j]
    return keys


def count_lookup(keys: np.ndarray, counts: np.ndarray, query: np.ndarray, missing=0) -> np.ndarray:
    """counts[i] where keys[i] == query (keys sorted and distinct), else `missing`; query of any shape."""
    i = np.searchsorted(keys, query).clip(max=max(len(keys) - 1, 0))
    found = keys[i] == query if len(keys) else np.zeros(query.shape, dtype=bool)
    return np.where(found, counts[i] if len(keys) else missing, missing)


def stock_table(train: np.ndarray, vocab_size: int, min_count: int) -> tuple[np.ndarray, np.ndarray, int]:
    """For every pair of tokens (a, b) in train: its most frequent next token c (ties to the smaller id), kept
    if (a, b, c) occurred at least min_count times. Returns (pair keys a * V + b, sorted; their c; V)."""
    tri, counts = np.unique(ngram_keys(train, 3, vocab_size), return_counts=True)
    pair, nxt = tri // vocab_size, tri % vocab_size
    order = np.lexsort((nxt, -counts, pair))  # by pair, then the most frequent next token first
    pair, nxt, counts = pair[order], nxt[order], counts[order]
    first = np.r_[True, pair[1:] != pair[:-1]] & (counts >= min_count)
    return pair[first], nxt[first], vocab_size


def token_classes(window: np.ndarray, stock, eot_id: int, skip: int) -> np.ndarray:
    """(B, T + 1) tokens (inputs x = window[:, :-1], targets y = window[:, 1:]) -> (B, T - skip) class codes of
    the targets scored (positions skip..T-1), from the text alone:
      0 stock       y_t is the most frequent continuation of (x_{t-1}, x_t) in train (stock_table)
      1 in-context  not stock, and y_t already occurred in the same story, earlier in the window
      2 other"""
    window = np.asarray(window, dtype=np.int64)
    B, T = window.shape[0], window.shape[1] - 1
    x, y = window[:, :-1], window[:, 1:]
    pairs, nxt, V = stock
    predicted = np.full((B, T), -1)
    predicted[:, 1:] = count_lookup(pairs, nxt, x[:, :-1] * V + x[:, 1:], missing=-1)  # (x_{t-1}, x_t) -> ?
    is_stock = predicted == y
    # story[b, j]: how many stories ended before token j (an <|endoftext|> belongs to the story it ends)
    ends = window == eot_id
    story = np.concatenate([np.zeros((B, 1), dtype=np.int64), np.cumsum(ends, axis=1)[:, :-1]], axis=1)
    same = (x[:, None, :] == y[:, :, None]) & (story[:, None, :T] == story[:, 1:, None])  # (B, t, j)
    seen = (same & np.tri(T, dtype=bool)).any(-1)  # some x_j, j <= t, of y_t's own story is y_t
    return np.where(is_stock, 0, np.where(seen, 1, 2))[:, skip:]


def frequency_buckets(counts: np.ndarray) -> np.ndarray:
    """Train counts -> bucket codes: 0 unseen, 1 for 1-9, 2 for 10-99, 3 for 100-999, 4 for 1000+."""
    return np.digitize(counts, EDGES)


@dataclass
class Text:
    """What the classes and buckets need from the data: all of it from the text, none from a model."""
    stock: tuple          # stock_table of the train split
    ngrams: np.ndarray    # the distinct canonical n-grams of train (their keys, sorted) ...
    counts: np.ndarray    # ... and how often each occurred
    canonical: np.ndarray  # (V,) token id -> canonical id (Engram's tokenizer compression, made from the vocabulary)
    order: int            # n: the longest order Engram hashes
    base: int             # canonical ids are < base
    eot_id: int


def read_text(train: np.ndarray, eng: Run, cfg: AnalyzeConfig) -> Text:
    compression = eng.model.compression
    canonical = compression.canonical_ids.cpu().numpy()
    order, base = max(eng.model.cfg.engram.ngram_orders), compression.n_canonical
    ngrams, counts = np.unique(ngram_keys(canonical[train], order, base), return_counts=True)
    return Text(stock_table(train, eng.tok.vocab_size, cfg.stock_min_count), ngrams, counts, canonical, order,
                base, eng.tok.eot_id)


def text_columns(window: np.ndarray, text: Text, skip: int) -> dict:
    """Per scored position of a batch of windows (B, T + 1): its class, the canonical n-gram Engram looks up
    there (key, raw tokens, train count, bucket). Each value (B, T - skip, ...)."""
    x = window[:, :-1]
    keys = ngram_keys(text.canonical[x], text.order, text.base)[:, skip - (text.order - 1):]  # (B, T - skip)
    counts = count_lookup(text.ngrams, text.counts, keys)
    raw = np.stack([x[:, skip - k:x.shape[1] - k] for k in range(text.order - 1, -1, -1)], axis=-1)  # (B, T-skip, n)
    return {"class": token_classes(window, text.stock, text.eot_id, skip), "ngram": keys, "ngram_tokens": raw,
            "train_count": counts, "bucket": frequency_buckets(counts)}


# ----------------------------------------------------------------------------- the models' own forward passes

def engram_modules(model) -> list:
    """[(block index, its Engram module)] from the bottom up."""
    return [(i, block.engram) for i, block in enumerate(model.blocks) if block.engram is not None]


def table_rows(engram, context):
    """(B, P+T) canonical ids -> (B, T, H) the table rows this Engram layer reads (§2.2's multi-head hash)."""
    return engram.rows(context)


@contextmanager
def knocked_out(engrams):
    """Inside: the blocks skip these Engram modules' residual term (paper §6.3's knockout)."""
    for e in engrams:
        e.knockout = True
    try:
        yield
    finally:
        for e in engrams:
            e.knockout = False


@contextmanager
def block_outputs(model):
    """Inside: a list that collects every block's output x (B, T, n, C) of the forward passes run."""
    outputs = []
    hooks = [b.register_forward_hook(lambda module, args, out: outputs.append(out)) for b in model.blocks]
    try:
        yield outputs
    finally:
        for h in hooks:
            h.remove()


def logits_with_knockout(model, idx, engrams=()):
    """The model's logits (B, T, V) with the residual term of the given Engram modules removed."""
    with knocked_out(engrams):
        return model(idx)[0]


def early_exit(model, h):
    """LogitLens: the model's own head read off a block's output h (B, T, n, C) -> (B, T, V) logits."""
    return model.lm_head(model.norm(model.collapse(h)))


def lens_kl(model, hidden: list, logits, skip: int) -> np.ndarray:
    """(L,) KL(final || block l) = sum_v p_final(v) (log p_final(v) - log p_l(v)), summed over the scored
    positions. The head sees each block's whole output, as the final one does, so the last block's is 0."""
    final = F.log_softmax(logits.float(), dim=-1)[:, skip:]
    kl = [F.kl_div(F.log_softmax(early_exit(model, h).float(), dim=-1)[:, skip:], final, log_target=True,
                   reduction="sum") for h in hidden]
    return torch.stack(kl).double().cpu().numpy()


def token_scores(logits, y, skip: int):
    """Per scored position: cross-entropy loss (nats) and whether the top-1 prediction is the target."""
    loss = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # (B, T)
    return loss[:, skip:].cpu().numpy(), (logits.argmax(-1) == y)[:, skip:].cpu().numpy()


def knockouts(engrams) -> dict:
    """{name: the Engram modules it removes}: all of them, and each alone (when there is more than one)."""
    plans = {"all": [e for _, e in engrams]}
    if len(engrams) > 1:
        plans.update({str(i): [e] for i, e in engrams})
    return plans


def probe_engram_model(model, x, y, skip: int, cols: dict) -> tuple[list, np.ndarray]:
    """One batch through the Engram model: scores, gates and table rows into cols, then every knockout's
    scores. Returns its block outputs and the LogitLens KL sums."""
    engrams = engram_modules(model)
    with block_outputs(model) as hidden:
        logits = model(x)[0]
    cols["loss"], cols["correct"] = token_scores(logits, y, skip)
    gates = [e.last_gate[:, skip:].mean(-1) for _, e in engrams if e.last_gate is not None]  # (B, T - skip) each
    cols["gate"] = torch.stack(gates).mean(0).cpu().numpy() if gates else np.full(cols["loss"].shape, np.nan)
    context = model.compression(x)  # (B, P + T) canonical ids, as the forward hashed them
    for i, e in engrams:
        cols[f"rows_{i}"] = table_rows(e, context)[:, skip:].cpu().numpy()  # (B, T - skip, H)
    for name, removed in knockouts(engrams).items():
        cols[f"ko_loss_{name}"], cols[f"ko_correct_{name}"] = token_scores(logits_with_knockout(model, x, removed),
                                                                           y, skip)
    return hidden, lens_kl(model, hidden, logits, skip)


def probe_twin(model, x, y, skip: int, cols: dict) -> tuple[list, np.ndarray]:
    with block_outputs(model) as hidden:
        logits = model(x)[0]
    cols["twin_loss"], cols["twin_correct"] = token_scores(logits, y, skip)
    return hidden, lens_kl(model, hidden, logits, skip)


# ----------------------------------------------------------------------------- CKA (§6.1.2)
# Linear CKA (Kornblith et al. 2019) of two representations X (N, d1) and Y (N, d2) of the same N tokens
# compares their Gram matrices K = X X^T and L = Y Y^T: CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)).
# HSIC is estimated without bias per minibatch of n tokens (Song et al. 2012), with K~, L~ = K, L with a zero
# diagonal:  HSIC_1 = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~ L~1] / (n (n-3)),
# and summed over minibatches before the ratio is taken (Nguyen et al. 2021), so no N x N matrix is formed.

def gram(x):
    """(n, d) -> (n, n) float64 Gram matrix with a zero diagonal (K~)."""
    x = x.double()
    return (x @ x.T).fill_diagonal_(0)


def hsic_unbiased(ks, ls):
    """(A, n, n) and (B, n, n) zero-diagonal Gram matrices of the same n tokens -> (A, B) HSIC_1 of every pair."""
    n = ks.shape[-1]
    trace = ks.flatten(1) @ ls.flatten(1).T  # tr(K~ L~) = sum_ij K~_ij L~_ij (both symmetric)
    sums = ks.sum((1, 2))[:, None] * ls.sum((1, 2))[None, :] / ((n - 1) * (n - 2))
    cross = ks.sum(1) @ ls.sum(1).T * 2 / (n - 2)  # 1'K~ L~1 = (K~1) . (L~1)
    return (trace + sums - cross) / (n * (n - 3))


class MinibatchCKA:
    """Linear CKA between each of A representations and each of B others, accumulated over minibatches."""

    def __init__(self, n_a: int, n_b: int):
        self.xy = torch.zeros(n_a, n_b, dtype=torch.float64)
        self.xx, self.yy = torch.zeros(n_a, dtype=torch.float64), torch.zeros(n_b, dtype=torch.float64)

    def update(self, xs: list, ys: list):
        """xs: A tensors (n, d_a), ys: B tensors (n, d_b), rows the same n >= 4 tokens."""
        ks, ls = torch.stack([gram(x) for x in xs]), torch.stack([gram(y) for y in ys])
        self.xy += hsic_unbiased(ks, ls).cpu()
        self.xx += torch.stack([hsic_unbiased(k[None], k[None])[0, 0] for k in ks]).cpu()
        self.yy += torch.stack([hsic_unbiased(l[None], l[None])[0, 0] for l in ls]).cpu()

    def result(self) -> np.ndarray:
        return (self.xy / (self.xx[:, None] * self.yy[None, :]).sqrt()).numpy()  # (A, B)


def cka_update(cka: MinibatchCKA, hidden_a: list, hidden_b: list, skip: int, batch: int):
    """Both models' block outputs (B, T, n, C) at the scored positions, one row per token (n streams side by
    side), into CKA minibatches of at most `batch` tokens."""
    on = "cpu" if hidden_a[0].device.type == "mps" else hidden_a[0].device  # MPS has no float64
    xs = [h[:, skip:].flatten(2).flatten(0, 1).to(on) for h in hidden_a]  # (B * (T - skip), n * C) each
    ys = [h[:, skip:].flatten(2).flatten(0, 1).to(on) for h in hidden_b]
    for part in torch.arange(xs[0].shape[0]).tensor_split(math.ceil(xs[0].shape[0] / batch)):
        if len(part) >= 4:
            cka.update([x[part] for x in xs], [y[part] for y in ys])


def alignment_index(sim: np.ndarray, k: int) -> np.ndarray:
    """Soft alignment index of each row j of a similarity matrix S (rows: one model's layers, columns: the
    other's): a_j = sum_{i in top-k of row j} S[j, i] * i / sum_{i in top-k of row j} S[j, i], the
    similarity-weighted centroid of the k most similar columns (negative similarities weigh 0)."""
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]  # (A, k)
    w = np.take_along_axis(sim, top, axis=1).clip(min=0)
    total = w.sum(1)
    return np.divide((w * top).sum(1), total, out=np.full(len(sim), np.nan), where=total > 0)


# ----------------------------------------------------------------------------- the pass over the windows

@torch.no_grad()
def score(cfg: AnalyzeConfig, eng: Run, twin: Run | None, val, text: Text, device) -> dict:
    """Every window through both models: per-position columns (text order), LogitLens KL means, CKA."""
    T = min(r.model.cfg.block_size for r in (eng, twin) if r is not None)
    skip = max(1, text.order - 1)  # the first position whose longest n-gram (and two preceding tokens) is inside
    starts = window_starts(len(val), T, cfg.windows)
    cols, kl = defaultdict(list), {"engram": 0.0, "twin": 0.0}
    cka = MinibatchCKA(eng.model.cfg.n_layer, twin.model.cfg.n_layer) if twin else None
    for i in tqdm(range(0, len(starts), cfg.batch_size), desc="analyze", unit="batch", disable=None):
        window = np.stack([val[s:s + T + 1] for s in starts[i:i + cfg.batch_size]]).astype(np.int64)  # (B, T + 1)
        x, y = (torch.from_numpy(a).to(device) for a in (window[:, :-1], window[:, 1:]))
        batch = text_columns(window, text, skip)
        hidden, kl_sums = probe_engram_model(eng.model, x, y, skip, batch)
        kl["engram"] = kl["engram"] + kl_sums
        if twin:
            twin_hidden, kl_sums = probe_twin(twin.model, x, y, skip, batch)
            kl["twin"] = kl["twin"] + kl_sums
            cka_update(cka, hidden, twin_hidden, skip, cfg.cka_batch)
        for key, value in batch.items():
            cols[key].append(value.reshape(-1, *value.shape[2:]))  # (B * (T - skip), ...): text order
    cols = {k: np.concatenate(v) for k, v in cols.items()}
    n = len(cols["loss"])
    return {"cols": cols, "n_tokens": n, "n_windows": len(starts), "T": T, "skip": skip,
            "lens": {k: (v / n).tolist() for k, v in kl.items() if k == "engram" or twin},
            "cka": None if cka is None else cka.result()}


# ----------------------------------------------------------------------------- the tables

def mean_of(values) -> float | None:
    return float(np.mean(values)) if len(values) else None


def ratio(a, b) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def knockout_results(cols: dict, has_twin: bool) -> dict:
    """Per token class (§6.3): the twin's loss, the Engram model's, its loss with every Engram layer knocked
    out, the share of Engram's gain (twin - Engram) that the knockout takes back, and the top-1 accuracy kept
    (knockout / full, the paper's measure); with several Engram layers, each one's knockout too."""
    n = len(cols["loss"])
    groups = {name: cols["class"] == code for code, name in enumerate(CLASSES)} | {"all": np.ones(n, dtype=bool)}
    layers = [k.removeprefix("ko_loss_") for k in cols if k.startswith("ko_loss_") and k != "ko_loss_all"]
    out = {}
    for name, m in groups.items():
        loss, ko = mean_of(cols["loss"][m]), mean_of(cols["ko_loss_all"][m])
        acc, ko_acc = mean_of(cols["correct"][m]), mean_of(cols["ko_correct_all"][m])
        row = {"tokens": int(m.sum()), "share": float(m.mean()), "engram_loss": loss, "knockout_loss": ko,
               "engram_acc": acc, "knockout_acc": ko_acc, "acc_retained": ratio(ko_acc, acc)}
        if has_twin:
            twin = mean_of(cols["twin_loss"][m])
            gain = None if twin is None else twin - loss
            row.update(twin_loss=twin, twin_acc=mean_of(cols["twin_correct"][m]),
                       gain_removed=ratio(ko - loss, gain) if gain and gain > 0 else None)
        row["layers"] = {i: {"knockout_loss": mean_of(cols[f"ko_loss_{i}"][m]),
                             "acc_retained": ratio(mean_of(cols[f"ko_correct_{i}"][m]), acc)} for i in layers}
        out[name] = row
    return out


def knockout_verdict(ko: dict) -> str:
    stock, context = ko["stock"]["acc_retained"], ko["in-context"]["acc_retained"]
    if stock is None or context is None:
        return "Too few stock or in-context tokens (or none predicted right) to compare the two classes."
    holds = "holds" if stock < context else "does not hold" if stock > context else "cannot be told (equal shares)"
    return (f"Here stock tokens keep {stock:.0%} of their top-1 accuracy under knockout and in-context tokens "
            f"{context:.0%}: the paper's pattern (what memory supplies is lost, what the context supplies is "
            f"kept) {holds}.")


def lens_results(lens: dict) -> dict:
    """LogitLens (§6.1.1) per block, and in how many blocks (the last, 0 for both, left out) Engram's is smaller."""
    out = {"kl_engram": lens["engram"], "kl_twin": lens.get("twin")}
    if "twin" in lens:
        pairs = list(zip(lens["engram"], lens["twin"]))[:-1]
        out["smaller_with_engram"] = sum(e < t for e, t in pairs)
        out["compared_blocks"] = len(pairs)
        out["largest_gap_block"] = int(np.argmax([t - e for e, t in pairs])) if pairs else None
    return out


def cka_results(sim: np.ndarray, top_k: int) -> dict:
    """CKA (§6.1.2): the (Engram blocks, twin blocks) matrix and each Engram block's alignment a_j - j."""
    k = min(top_k or math.ceil(sim.shape[1] / 4), sim.shape[1])
    a = alignment_index(sim, k)
    return {"similarity": sim.tolist(), "top_k": k, "alignment": a.tolist(),
            "offset": (a - np.arange(len(a))).tolist(), "most_similar": sim.argmax(1).tolist()}


def frequency_results(cols: dict, has_twin: bool) -> list:
    """Per train-count bucket of the looked-up n-gram: the two models' losses, their difference, the gate."""
    rows = []
    for code, name in enumerate(BUCKETS):
        m = cols["bucket"] == code
        loss, gate = mean_of(cols["loss"][m]), cols["gate"][m]
        twin = mean_of(cols["twin_loss"][m]) if has_twin else None
        rows.append({"bucket": name, "tokens": int(m.sum()), "share": float(m.mean()), "twin_loss": twin,
                     "engram_loss": loss, "difference": None if twin is None or loss is None else loss - twin,
                     "mean_gate": mean_of(gate) if len(gate) and not np.isnan(gate).all() else None})
    return rows


def gate_ranking(cols: dict, tok, min_count: int, top: int) -> dict | None:
    """§6.5: the n-grams (longest order, grouped by canonical ids, shown as their first occurrence's text) with
    the highest and lowest mean gate over the scored positions, among those scored at least min_count times."""
    if np.isnan(cols["gate"]).all():
        return None  # an ungated Engram (--engram_gate=false)
    _, first, inverse, counts = np.unique(cols["ngram"], return_index=True, return_inverse=True, return_counts=True)
    mean = np.bincount(inverse, weights=cols["gate"]) / counts
    ranked = np.flatnonzero(counts >= min_count)
    ranked = ranked[np.argsort(-mean[ranked], kind="stable")]

    def row(i):
        return {"ngram": tok.decode(cols["ngram_tokens"][first[i]]), "mean_gate": float(mean[i]),
                "count": int(counts[i]), "train_count": int(cols["train_count"][first[i]])}
    return {"ranked": len(ranked), "highest": [row(i) for i in ranked[:top]],
            "lowest": [row(i) for i in ranked[::-1][:top]]}


def lru_hit_rate(seq, capacity: int) -> float:
    """Share of the lookups in seq (in order) served by an LRU cache of `capacity` rows, empty at the start."""
    cache, hits = OrderedDict(), 0
    for r in seq.tolist():
        if r in cache:
            hits += 1
            cache.move_to_end(r)
        else:
            cache[r] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return hits / max(len(seq), 1)


def access_skew(cols: dict, model) -> dict:
    """§2.5: per Engram block and head, the share of its lookups served by its hottest 1, 10 and 50% of rows,
    and the hit rate of an LRU cache that holds as many rows, over the scored text in order."""
    out = {}
    for i, e in engram_modules(model):
        rows = cols[f"rows_{i}"]  # (N, H)
        orders = [n for n in e.cfg.ngram_orders for _ in range(e.cfg.engram_heads_per_order)]
        heads = []
        for h in range(rows.shape[1]):
            size, seq = int(e.head_primes[h]), rows[:, h] - int(e.head_offsets[h])
            counts = np.sort(np.bincount(seq, minlength=size))[::-1]
            caps = {f"{f:.0%}": math.ceil(f * size) for f in HOT}
            heads.append({"head": h, "order": orders[h], "rows": size, "distinct_rows_read": int((counts > 0).sum()),
                          "hottest_share": {k: float(counts[:c].sum() / len(seq)) for k, c in caps.items()},
                          "lru_hit_rate": {k: lru_hit_rate(seq, c) for k, c in caps.items()}})
        out[str(i)] = heads
    return out


# ----------------------------------------------------------------------------- the report

def fmt(x, spec=".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def table(header: list, rows: list) -> list:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def md_knockout(r: dict) -> list:
    ko, twin = r["knockout"], r["twin"] is not None
    lines = ["## Knockout (§6.3)", "",
             f"Every Engram layer's residual term removed (blocks {r['engram_blocks']}), the rest of the model as "
             "trained. Token classes come from the text alone: *stock*: the target is the most frequent "
             f"continuation of its two preceding tokens in train, seen at least {r['settings']['stock_min_count']} "
             "times (n-gram memory's territory); *in-context*: not stock, and the target already occurred earlier in "
             "the same story within the window (names and objects the story introduced); *other*: the rest. "
             "Gain removed = (knockout - Engram) / (twin - Engram) loss; accuracy retained = knockout / Engram "
             "top-1 accuracy.", ""]
    rows = [[name, f"{c['tokens']:,} ({c['share']:.0%})", fmt(c.get("twin_loss")), fmt(c["engram_loss"]),
             fmt(c["knockout_loss"]), fmt(c.get("gain_removed"), ".0%"), fmt(c["engram_acc"], ".1%"),
             fmt(c["knockout_acc"], ".1%"), fmt(c["acc_retained"], ".0%")] for name, c in ko.items()]
    lines += table(["class", "tokens", "twin loss", "Engram loss", "knockout loss", "gain removed", "Engram acc",
                    "knockout acc", "acc retained"], rows)
    if layers := list(ko["all"]["layers"]):
        lines += ["", "Each Engram layer knocked out alone (loss, accuracy retained):", ""]
        cell = lambda c: f"{fmt(c['knockout_loss'])}, {fmt(c['acc_retained'], '.0%')}"  # noqa: E731
        lines += table(["class"] + [f"block {i}" for i in layers],
                       [[name] + [cell(c["layers"][i]) for i in layers] for name, c in ko.items()])
    if not twin:
        lines += ["", "No twin was given: the twin's loss and the gain removed need one."]
    return lines + ["", f"Paper: {PAPER['knockout']}. {knockout_verdict(ko)}", ""]


def md_lens(r: dict) -> list:
    lens = r["logit_lens"]
    twin = lens["kl_twin"] or [None] * len(lens["kl_engram"])
    n = max(len(lens["kl_engram"]), len(twin))
    pad = lambda v: v + [None] * (n - len(v))  # noqa: E731  (depths may differ)
    rows = [[str(i), fmt(t, ".4f"), fmt(e, ".4f"), fmt(None if t is None or e is None else e - t, "+.4f")]
            for i, (e, t) in enumerate(zip(pad(lens["kl_engram"]), pad(twin)))]
    lines = ["## LogitLens (§6.1.1)", "",
             "Mean KL(final prediction || the prediction of the model's own final norm and head applied to a "
             "block's output) over the scored tokens, in nats.", ""]
    lines += table(["block", "twin KL", "Engram KL", "Engram - twin"], rows)
    verdict = "No twin was given, so there is nothing to compare with."
    if lens["kl_twin"] is not None and lens["compared_blocks"]:
        k, m = lens["smaller_with_engram"], lens["compared_blocks"]
        verdict = (f"Here the KL is smaller with Engram at {k} of {m} blocks (the last, 0 for both, left out), the "
                   f"gap widest at block {lens['largest_gap_block']}: the paper's pattern "
                   f"{'holds' if k == m else 'holds in part' if k > m / 2 else 'does not hold'}.")
    return lines + ["", f"Paper: {PAPER['lens']}. {verdict}", "", "![LogitLens](analysis_logit_lens.png)", ""]


def md_cka(r: dict) -> list:
    cka = r["cka"]
    if cka is None:
        return ["## CKA (§6.1.2)", "", "No twin was given: CKA compares the Engram model with it.", ""]
    rows = [[str(j), fmt(a, ".2f"), fmt(o, "+.2f"), str(s)]
            for j, (a, o, s) in enumerate(zip(cka["alignment"], cka["offset"], cka["most_similar"]))]
    offsets = [o for o in cka["offset"] if o is not None]
    mean = float(np.mean(offsets)) if offsets else None
    lines = ["## CKA (§6.1.2)", "",
             "Linear CKA (unbiased HSIC, summed over minibatches of at most "
             f"{r['settings']['cka_batch']} tokens) between every block of the Engram model (rows) and every block "
             "of its twin (columns), on the same tokens. Soft alignment index of Engram block j: "
             "a_j = sum over the top-k twin blocks i of S[j,i] * i / sum of those S[j,i], with "
             f"k = {cka['top_k']} (ceil of the twin's depth / 4 unless --cka_top_k); blocks count from 0.", ""]
    lines += table(["Engram block j", "a_j", "a_j - j", "most similar twin block"], rows)
    verdict = "" if mean is None else (f"Here a_j - j averages {mean:+.2f}: the paper's direction "
                                       f"{'holds' if mean > 0 else 'does not hold'}.")
    return lines + ["", f"Paper: {PAPER['cka']}. {verdict}", "", "![CKA](analysis_cka.png)", ""]


def md_frequency(r: dict) -> list:
    rows = [[b["bucket"], f"{b['tokens']:,} ({b['share']:.0%})", fmt(b["twin_loss"]), fmt(b["engram_loss"]),
             fmt(b["difference"], "+.3f"), fmt(b["mean_gate"])] for b in r["frequency"]]
    lines = ["## Loss by n-gram frequency", "",
             f"Scored positions by how often the {r['order']}-gram Engram looks up there (canonical ids, ending at "
             f"the input token) occurred in the first {r['train_tokens']:,} train tokens. Mean gate: over the "
             "gated Engram layers and their streams.", ""]
    header = ["train count", "tokens", "twin loss", "Engram loss", "Engram - twin", "mean gate"]
    return lines + table(header, rows) + [""]


def md_gates(r: dict) -> list:
    g = r["gates"]
    if g is None:
        return ["## Gates (§6.5)", "", "This Engram is ungated (--engram_gate=false).", ""]
    cell = lambda text: repr(text).replace("|", "\\|")  # noqa: E731
    lines = ["## Gates (§6.5)", "",
             f"Mean gate over the scored positions of each {r['order']}-gram (grouped by canonical ids, shown as "
             f"its first occurrence), among the {g['ranked']:,} scored at least "
             f"{r['settings']['gate_min_count']} times.", ""]
    for end in ("highest", "lowest"):
        lines += [f"{end.capitalize()} mean gate:", ""]
        lines += table(["n-gram", "mean gate", "count here", "count in train"],
                       [[cell(x["ngram"]), fmt(x["mean_gate"]), str(x["count"]), f"{x['train_count']:,}"]
                        for x in g[end]]) + [""]
    return lines


def md_access(r: dict) -> list:
    lines = ["## Row access skew (§2.5)", "",
             "Per head: the share of its lookups served by its hottest 1, 10 and 50% of rows, and the hit rate of an "
             "LRU cache holding as many rows (empty at the start), over the scored text in order.", ""]
    rows = [[block, str(h["head"]), str(h["order"]), f"{h['rows']:,}", f"{h['distinct_rows_read']:,}"]
            + [fmt(h["hottest_share"][k], ".0%") for k in h["hottest_share"]]
            + [fmt(h["lru_hit_rate"][k], ".0%") for k in h["lru_hit_rate"]]
            for block, heads in r["access"].items() for h in heads]
    hot = [f"{f:.0%}" for f in HOT]
    return lines + table(["block", "head", "order", "rows", "rows read"] + [f"hottest {k}" for k in hot]
                         + [f"LRU {k}" for k in hot], rows) + [""]


def markdown(r: dict) -> str:
    twin = f"`{r['twin']}`" if r["twin"] else "none"
    lines = ["# Engram analysis", "",
             f"Engram run `{r['engram']}` (Engram in blocks {r['engram_blocks']}, n-gram orders {r['orders']}); "
             f"twin without Engram: {twin}.", "",
             f"Scored {r['tokens']:,} tokens: {r['windows']:,} windows of {r['block_size']} tokens, one after another "
             f"from the start of the val split of `{r['data_dir']}` ({r['val_tokens']:,} tokens in all), each scored "
             f"from position {r['skip']} on (the first whose {r['order']}-gram lies inside the window). N-grams "
             f"counted over the first {r['train_tokens']:,} train tokens. {r['seconds']:.0f} s on {r['device']}.", ""]
    for section in (md_knockout, md_lens, md_cka, md_frequency, md_gates, md_access):
        lines += section(r)
    return "\n".join(lines)


def plot_lens(lens: dict):
    """LogitLens: the mean KL per block of both models (analysis_logit_lens.png)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(range(len(lens["kl_engram"])), lens["kl_engram"], "o-", label="with Engram")
    if lens["kl_twin"] is not None:
        ax.plot(range(len(lens["kl_twin"])), lens["kl_twin"], "s--", label="twin without Engram")
    ax.set_xlabel("block")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean KL(final || block), nats")
    ax.set_title("LogitLens (Engram paper §6.1.1)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_cka(cka: dict):
    """The CKA matrix as a heatmap, with each Engram block's soft alignment index (analysis_cka.png)."""
    sim = np.array(cka["similarity"])
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    im = ax.imshow(sim, origin="lower", cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.plot(cka["alignment"], range(len(sim)), "r^-", label=f"soft alignment a_j (top-{cka['top_k']})")
    ax.plot([0, min(sim.shape) - 1], [0, min(sim.shape) - 1], "w:", lw=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("twin block (no Engram)")
    ax.set_ylabel("Engram model block j")
    ax.set_title("linear CKA (Engram paper §6.1.2)")
    ax.legend(loc="upper left", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def plain(x):
    """numpy numbers to Python ones and non-finite floats to None, for strict JSON."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def summarize(cfg, eng: Run, twin: Run | None, s: dict, info: dict) -> dict:
    """Every number of the report, from score's columns."""
    cols = s["cols"]
    return plain({
        **info, "engram": eng.path, "twin": twin.path if twin else None, "settings": asdict(cfg),
        "engram_blocks": [i for i, _ in engram_modules(eng.model)], "orders": list(eng.model.cfg.engram.ngram_orders),
        "order": max(eng.model.cfg.engram.ngram_orders), "tokens": s["n_tokens"], "windows": s["n_windows"],
        "block_size": s["T"], "skip": s["skip"],
        "knockout": knockout_results(cols, twin is not None),
        "logit_lens": lens_results(s["lens"]),
        "cka": None if s["cka"] is None else cka_results(s["cka"], cfg.cka_top_k),
        "frequency": frequency_results(cols, twin is not None),
        "gates": gate_ranking(cols, eng.tok, cfg.gate_min_count, cfg.gate_top),
        "access": access_skew(cols, eng.model),
    })


def write_outputs(out_dir: str, r: dict) -> list:
    paths = [os.path.join(out_dir, name) for name in ("analysis.md", "analysis.json", "analysis_logit_lens.png")]
    harness.write_atomic(paths[0], (markdown(r) + "\n").encode())
    harness.write_atomic(paths[1], json.dumps(r, indent=1, allow_nan=False).encode())
    harness.save_figure(plot_lens(r["logit_lens"]), paths[2])
    if r["cka"] is not None:
        paths.append(os.path.join(out_dir, "analysis_cka.png"))
        harness.save_figure(plot_cka(r["cka"]), paths[-1])
    return paths


def analyze(cfg: AnalyzeConfig) -> dict:
    device, _ = cli.setup_device(cfg.device, cfg.kernels)  # the analysis runs in float32
    eng, twin = open_runs(cfg, device)
    out_dir = cfg.out_dir or eng.path
    harness.check_writable_dir(out_dir, "out_dir")
    train, val, data_dir = open_data(cfg, eng)
    t0 = time.time()
    text = read_text(train, eng, cfg)
    s = score(cfg, eng, twin, val, text, device)
    info = {"data_dir": data_dir, "train_tokens": len(train), "val_tokens": len(val), "device": device}
    r = summarize(cfg, eng, twin, s, {**info, "seconds": time.time() - t0})
    paths = write_outputs(out_dir, r)
    print(knockout_verdict(r["knockout"]))
    print(f"scored {r['tokens']:,} tokens in {r['seconds']:.0f} s; wrote {', '.join(paths)}")
    return r


def main(argv=None):
    try:
        cfg = cli.parse(AnalyzeConfig(), sys.argv[1:] if argv is None else argv, __doc__)
        if not cfg.runs:
            raise cli.ConfigError("--runs is missing: --runs=ENGRAM_RUN[,TWIN_RUN] (a twin trained with --engram=off)")
        return analyze(cfg)
    except (cli.ConfigError, DataError) as e:
        cli.fail(e)
    except KeyboardInterrupt:
        cli.fail("interrupted", 130)


if __name__ == "__main__":
    main()
