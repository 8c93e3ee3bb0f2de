"""TinyStories data: get the text, tokenize it, write memmaps, serve batches.

`python data.py` (or train.py, through `load_or_prepare`, when the files are missing):
  1. text: download TinyStories-train.txt / -valid.txt from the Hugging Face hub into data_dir/raw
     (resumable .part files), or read local .txt/.txt.gz files given with --source. Only the first
     --max_train_mb MiB of train are used (64 by default; 0 = all of it, about 1.9 GiB).
  2. tokens: tiktoken "gpt2" on each stripped story, then one <|endoftext|> token after it.
  3. vocabulary: TinyStories uses only a few thousand of GPT-2's 50,257 tokens, so by default ("compact")
     we keep the ids seen in train, renumber them densely and map the rest to one <unk> id. That makes
     the embedding and output layer of a small model several times smaller and faster.
  4. files: train.bin / val.bin (uint16 model ids, read back as memmaps) and meta.json (counts, mapping).
Training then draws random windows from the memmaps with `get_batch`.
"""
import copy
import errno
import gzip
import http.client
import json
import os
import re
import shlex
import sys
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import tiktoken
import torch
from tqdm import tqdm

import cli

# The env var of the same name overrides it, so that tests can serve the files from a local http.server.
TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main"
HUB_FILES = {"train": "TinyStories-train.txt", "val": "TinyStories-valid.txt"}
SPLITS = ("train", "val")
EOT = b"<|endoftext|>"          # the separator line between stories in the text files
GPT2_VOCAB_SIZE, GPT2_EOT = 50257, 50256
VOCABS = ("compact", "gpt2")    # --vocab: the ids seen in train plus <unk>, or all of gpt2's
HOLDOUT_FRACTION = 0.05         # share of the stories held out as val when the source has no val file
POOL_MIN_BYTES = 20 * 2**20      # below this, tokenize in-process: starting workers costs more than it saves
STORIES_PER_BATCH = 1024
MB = 2**20                       # --max_train_mb counts MiB
NO_NET_HINT = "pass --source=PATH with a local copy of TinyStories (a .txt/.txt.gz file or a folder of them)"


@dataclass
class DataConfig:
    data_dir: str = "data"        # folder for train.bin, val.bin and meta.json (made if missing)
    source: str = ""              # local TinyStories .txt/.txt.gz file or folder; empty = download from the hub
    vocab: str = "compact"        # compact (only the ids seen in train, plus <unk>) or gpt2 (all 50,257)
    max_train_mb: float = 64.0    # use only the first N MiB of the train split; 0 = all of it

    def __post_init__(self):
        cli.check_numbers(self, nonneg=("max_train_mb",), one_of={"vocab": VOCABS})
        if not self.data_dir:
            raise ValueError("--data_dir is empty; give a folder, e.g. --data_dir=data")
        if 0 < self.max_train_mb * MB < 1:  # would round to 0 bytes, which means all of train
            raise ValueError(f"--max_train_mb={self.max_train_mb}: less than one byte; give 0 for all of train, or a few MiB")


class DataError(Exception):
    """A data problem the user can fix; the message is one line saying how."""


class StaleData(DataError):
    """Prepared files that are damaged or do not match each other. They are derived from the text, so
    load_or_prepare rebuilds them; anyone else is told the command that does. Both parts stay in args
    so that the error survives pickling, e.g. out of a Pool worker."""

    def __init__(self, problem: str, rebuild: str):
        super().__init__(problem, rebuild)
        self.problem = problem

    def __str__(self):
        return f"{self.args[0]}; rebuild with {self.args[1]}"


# -----------------------------------------------------------------------------
# Prepare: the stories -> gpt2 ids -> model ids on disk (train.bin, val.bin, meta.json)


def prepare(cfg: DataConfig) -> dict:
    """Get the text, tokenize it and write train.bin, val.bin and meta.json into cfg.data_dir; return meta."""
    t0 = time.time()
    out, max_bytes = make_data_dir(cfg.data_dir), int(cfg.max_train_mb * MB)
    gpt2_encoding()  # fail before any download if the tokenizer cannot load
    if cfg.source:
        files = find_source_files(cfg.source)
    else:
        files = {"train": [download(HUB_FILES["train"], out / "raw", max_bytes)],
                 "val": [download(HUB_FILES["val"], out / "raw")]}
    train_stories, val_stories, val_note = split_stories(files, max_bytes)
    stories = {"train": train_stories, "val": val_stories}
    n_bytes = sum(p.stat().st_size for p in files["train"] + files["val"])
    use_pool = min(n_bytes, max_bytes or n_bytes) > POOL_MIN_BYTES

    tmp = {split: out / f"{split}.gpt2.tmp" for split in SPLITS}
    try:
        counts = {split: tokenize_to_file(stories[split], tmp[split], use_pool, split) for split in SPLITS}
        for split in SPLITS:
            if counts[split][GPT2_EOT] == 0:
                raise DataError(f"found no {split} stories in {', '.join(map(str, files[split] or files['train']))}; "
                                "stories must be separated by <|endoftext|> lines")
        if cfg.vocab == "compact":  # the ids seen in train (<|endoftext|> among them), in increasing order
            gpt2_ids = np.flatnonzero(counts["train"])
            unk_id = len(gpt2_ids)
        else:
            gpt2_ids, unk_id = np.arange(GPT2_VOCAB_SIZE), None
        lookup = np.full(GPT2_VOCAB_SIZE, len(gpt2_ids), dtype=np.uint16)  # gpt2 id -> model id; unseen -> <unk>
        lookup[gpt2_ids] = np.arange(len(gpt2_ids))
        # The old files stayed usable until now; from here on, old meta must not sit beside new bins.
        (out / "meta.json").unlink(missing_ok=True)
        for split in SPLITS:
            _write_mapped(tmp[split], out / f"{split}.bin", lookup)
    except OSError as err:  # a full disk, most often: one line, and no half-written token file left behind
        raise write_error(out, err) from None
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)

    n_tokens = {split: int(counts[split].sum()) for split in SPLITS}
    val_unk = int(counts["val"][counts["train"] == 0].sum()) if unk_id is not None else 0
    meta = {
        "source": source_key(cfg.source),
        "files": {split: [str(p) for p in files[split]] for split in SPLITS},
        "val_from": val_note,
        "max_train_mb": float(cfg.max_train_mb),
        "vocab": cfg.vocab,
        "vocab_size": len(gpt2_ids) + (unk_id is not None),
        "eot_id": int(lookup[GPT2_EOT]),
        "unk_id": unk_id,
        **{f"{split}_tokens": n_tokens[split] for split in SPLITS},
        **{f"{split}_stories": int(counts[split][GPT2_EOT]) for split in SPLITS},
        "val_unk_tokens": val_unk,
        "val_unk_fraction": val_unk / n_tokens["val"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "prepare_seconds": round(time.time() - t0, 2),
        "gpt2_ids": gpt2_ids.tolist() if unk_id is not None else None,  # model id i = gpt2 id gpt2_ids[i]
    }
    tmp_meta = out / "meta.json.tmp"
    try:
        tmp_meta.write_text(json.dumps(meta, indent=1))
        os.replace(tmp_meta, out / "meta.json")
    except OSError as err:
        tmp_meta.unlink(missing_ok=True)
        raise write_error(out, err) from None
    print(f"data: train {meta['train_stories']:,} stories, {n_tokens['train']:,} tokens; "
          f"val {meta['val_stories']:,} stories, {n_tokens['val']:,} tokens")
    if unk_id is not None:
        print(f"data: compact vocab {meta['vocab_size']:,} ids ({len(gpt2_ids):,} gpt2 ids seen in train + <unk>); "
              f"val tokens that became <unk>: {val_unk:,} ({100 * meta['val_unk_fraction']:.3f}%)")
    print(f"data: wrote {out}/train.bin, val.bin, meta.json in {meta['prepare_seconds']:.1f}s")
    return meta


def load_or_prepare(cfg: DataConfig) -> dict:
    """Reuse the files in cfg.data_dir if they are whole and were made with cfg's source, vocab and size;
    else prepare them again, saying why (they are derived from the text, so nothing is lost)."""
    out = Path(cfg.data_dir)
    if not (out / "meta.json").is_file():  # a first run, or a prepare that was interrupted
        return prepare(cfg)
    try:
        meta = load_meta(out)
        if changed := settings_changed(meta, cfg):
            print(f"data: {out} was prepared with other settings ({changed}); preparing the data again")
            return prepare(cfg)
        for split in SPLITS:
            load_tokens(out, split, meta)
        return meta
    except StaleData as err:
        print(f"data: {err.problem}; preparing the data again")
        return prepare(cfg)


def split_tokens(cfg: DataConfig) -> int:
    """The train split's tokens, preparing the data first if needed (a later load_or_prepare finds it ready).
    Under torchrun the ranks would prepare it side by side, so there it must exist already."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not os.path.isfile(os.path.join(cfg.data_dir, "meta.json")):
        raise cli.ConfigError(f"--preset=cpu sizes Engram's table by the train split, which {cfg.data_dir} does "
                              "not hold yet: run python data.py with the same data flags first, or give --engram_rows_per_head")
    return load_or_prepare(cfg)["train_tokens"]


def split_stories(files: dict, max_bytes: int):
    """(train stories, val stories, note): val from the val files, else the last 5% of the train stories."""
    if files["val"]:
        return iter_stories(files["train"], max_bytes), iter_stories(files["val"]), "val files"
    n = sum(1 for _ in iter_stories(files["train"], max_bytes))  # this pass warns; the two below stay quiet
    n_val = round(n * HOLDOUT_FRACTION)
    if n_val < 1:
        raise DataError(f"{files['train'][0]} has {n} stories, too few to hold out a val split; "
                        "add a file whose name contains 'valid'")
    note = f"held out the last {n_val} of {n} train stories as val (no val file)"
    print(f"data: {note}")
    return (islice(iter_stories(files["train"], max_bytes, warn=False), n - n_val),
            islice(iter_stories(files["train"], max_bytes, warn=False), n - n_val, None), note)


def iter_stories(paths, max_bytes: int = 0, warn: bool = True):
    """Yield each non-empty story, stripped; stories end at a <|endoftext|> separator.

    With max_bytes, stop before the first line that would pass it: the story it belongs to is dropped,
    so only complete stories are kept. With warn, say (once per file) how many bytes were not UTF-8.
    """
    used = 0
    for path in paths:
        story, n_bad, separated, cut = [], 0, False, False
        try:
            with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
                for line in f:
                    used += len(line)
                    if max_bytes and used > max_bytes:
                        cut = True
                        break
                    *ended, rest = line.split(EOT)
                    for piece in ended:
                        text, bad = _decode(b"".join(story + [piece]))
                        n_bad, separated, story = n_bad + bad, True, []
                        if text := text.strip():
                            yield text
                    story.append(rest)
        except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
            raise DataError(_read_error(path, err)) from None
        last, bad = ("", 0) if cut else _decode(b"".join(story))  # a last story with no separator
        if last.strip() and not separated:
            raise DataError(f"{path} has no <|endoftext|> separator at all: each story must end with a line "
                            "holding only <|endoftext|>, as in TinyStories-train.txt")
        if warn and n_bad + bad:
            n = n_bad + bad
            tqdm.write(f"data: warning: {n:,} byte{'s' * (n != 1)} of {path} {'are' if n != 1 else 'is'} not "
                       "valid UTF-8 and became U+FFFD (convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8)",
                       file=sys.stderr)  # tqdm.write: on a line of its own, not glued to a progress bar
        if last := last.strip():
            yield last
        if cut:
            return


def _encode_batch(texts: list[str]) -> np.ndarray:
    ids = [i for toks in gpt2_encoding().encode_ordinary_batch(texts) for i in (*toks, GPT2_EOT)]
    return np.array(ids, dtype=np.uint16)


def tokenize_to_file(stories, path: Path, use_pool: bool, desc: str) -> np.ndarray:
    """Write the gpt2 ids of the stories, each followed by <|endoftext|>, to path; return each id's count."""
    counts = np.zeros(GPT2_VOCAB_SIZE, dtype=np.int64)
    stories = iter(stories)
    batches = iter(lambda: list(islice(stories, STORIES_PER_BATCH)), [])
    pool = Pool(min(8, os.cpu_count() or 1)) if use_pool else None
    try:
        results = pool.imap(_encode_batch, batches) if pool else map(_encode_batch, batches)
        with open(path, "wb") as f, tqdm(unit=" stories", desc=desc, disable=None) as bar:
            for ids in results:
                ids.tofile(f)
                batch_counts = np.bincount(ids, minlength=GPT2_VOCAB_SIZE)
                counts += batch_counts
                bar.update(int(batch_counts[GPT2_EOT]))  # one separator per story
    finally:
        if pool:
            pool.terminate()
    return counts


def _write_mapped(src: Path, dst: Path, lookup: np.ndarray):
    """dst = lookup[src], chunk by chunk (the full train split need not fit in memory), written atomically."""
    ids = np.memmap(src, dtype=np.uint16, mode="r")
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            for i in range(0, len(ids), 16 * MB):
                lookup[ids[i:i + 16 * MB]].tofile(f)
        del ids
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# Tokenizer: text <-> model ids, through the compact mapping


@lru_cache(maxsize=1)
def gpt2_encoding():
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as err:  # tiktoken downloads its BPE files on first use
        raise DataError(f"could not load the tiktoken gpt2 encoding ({_one_line(err)}); without internet, set "
                        "TIKTOKEN_CACHE_DIR to a folder holding its cached BPE files") from None


class Tokenizer:
    """Model id i stands for gpt2 id gpt2_ids[i]; in the compact vocabulary, id len(gpt2_ids) is <unk>."""

    def __init__(self, gpt2_ids: list[int] | None = None):  # None: the full gpt2 vocabulary
        self.enc = gpt2_encoding()
        self.gpt2_ids = np.arange(GPT2_VOCAB_SIZE) if gpt2_ids is None else np.asarray(gpt2_ids, dtype=np.int64)
        self.unk_id = None if gpt2_ids is None else len(self.gpt2_ids)
        self.vocab_size = len(self.gpt2_ids) + (self.unk_id is not None)
        self.to_model = np.full(GPT2_VOCAB_SIZE, len(self.gpt2_ids), dtype=np.int64)  # unseen gpt2 ids -> <unk>
        self.to_model[self.gpt2_ids] = np.arange(len(self.gpt2_ids))
        self.eot_id = int(self.to_model[GPT2_EOT])
        self._token_bytes = None

    @classmethod
    def from_meta(cls, meta: dict):
        return cls(meta["gpt2_ids"])

    @classmethod
    def load(cls, data_dir):
        return cls.from_meta(load_meta(data_dir))

    def encode(self, text: str) -> list[int]:
        """Ordinary text only: a literal "<|endoftext|>" stays text; use eot_id for the separator."""
        return self.to_model[np.asarray(self.enc.encode_ordinary(text), dtype=np.int64)].tolist()

    def decode(self, ids) -> str:
        # join bytes, not strings: a character may span several tokens
        if self._token_bytes is None:
            self.token_bytes()  # builds the table once; token_bytes() hands out copies of it
        return b"".join(self._token_bytes[int(i)] for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> list[bytes]:
        """The raw bytes of each model id (b"<unk>" for <unk>)."""
        if self._token_bytes is None:
            self._token_bytes = [self.enc.decode_single_token_bytes(int(g)) for g in self.gpt2_ids]
            self._token_bytes += [b"<unk>"] * (self.unk_id is not None)
        return list(self._token_bytes)

    def byte_lengths(self, device="cpu") -> torch.Tensor:
        """(vocab,) the UTF-8 bytes of each model id, 0 for <|endoftext|> and <unk>: bits per byte leaves them out."""
        lengths = torch.tensor([len(b) for b in self.token_bytes()], device=device)
        for special in (self.eot_id, self.unk_id):
            if special is not None:
                lengths[special] = 0
        return lengths


# -----------------------------------------------------------------------------
# Batches for training and evaluation


def load_tokens(data_dir, split: str, meta: dict | None = None) -> np.memmap:
    """split's token ids, as a read-only memmap. With meta (from load_meta), the file must be the one meta
    describes: as many tokens, none outside the vocabulary. Otherwise it is a StaleData error."""
    path = Path(data_dir) / f"{split}.bin"
    n_bytes = path.stat().st_size if path.is_file() else 0
    if meta is not None and n_bytes != 2 * meta[f"{split}_tokens"]:
        if not path.is_file():
            held = "is missing"
        elif n_bytes % 2:
            held = f"has an odd size ({n_bytes:,} bytes)"
        else:
            held = f"holds {n_bytes // 2:,} tokens"
        raise StaleData(f"{path} {held} but {Path(data_dir) / 'meta.json'} says {meta[f'{split}_tokens']:,} "
                        "(cut short, or written by another run)", rebuild_command(data_dir, meta))
    if n_bytes == 0:
        raise DataError(f"no tokens in {path}; run `python data.py --data_dir={data_dir}` (add --source=PATH offline)")
    if n_bytes % 2:
        raise StaleData(f"{path} has an odd size ({n_bytes:,} bytes), so it is not a file of 2-byte token ids",
                        rebuild_command(data_dir))
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    if meta is not None and (top := int(tokens.max())) >= meta["vocab_size"]:
        raise StaleData(f"{path} holds token id {top:,} but {Path(data_dir) / 'meta.json'} says the vocabulary "
                        f"has {meta['vocab_size']:,} ids (written by another run?)", rebuild_command(data_dir, meta))
    return tokens


def _check_length(n_tokens: int, block_size: int, what: str):
    if n_tokens < block_size + 2:
        raise DataError(f"{what} has only {n_tokens} tokens, fewer than block_size + 2 = {block_size + 2}; "
                        "use a smaller --block_size or more data")


def batch_at(tokens, starts, block_size: int, device):
    """x, y (B, T) int64 from the windows tokens[s : s+T+1]; y is x shifted left by one (next-token targets)."""
    buf = torch.from_numpy(np.stack([tokens[s:s + block_size + 1] for s in starts]).astype(np.int64))  # (B, T+1)
    if torch.device(device).type == "cuda":  # pinned host memory lets the copy overlap with compute
        buf = buf.pin_memory().to(device, non_blocking=True)
    return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()


def get_batch(tokens, batch_size: int, block_size: int, rng: np.random.Generator, device, rank: int = 0,
              world: int = 1):
    """This rank's share of batch_size * world random windows of block_size + 1 tokens -> x, y (B, T) int64.

    Every rank draws the whole global batch from an rng seeded alike and keeps its own slice, so a DDP run
    sees the same data as one process with batch_size * world (and world=1 is a plain draw of batch_size).
    """
    filename = getattr(tokens, "filename", None)  # a memmap knows its file, which names the split
    _check_length(len(tokens), block_size, f"the {Path(filename).stem} split" if filename else "the token array")
    starts = rng.integers(0, len(tokens) - block_size - 1, size=batch_size * world)
    return batch_at(tokens, starts[rank * batch_size:(rank + 1) * batch_size], block_size, device)


class Batches:
    """The training batches of one rank: next() draws one (get_batch), peek() the one after it without drawing
    (from a copy of the generator, for tables that gather a batch's rows ahead). rng's state is what a
    checkpoint saves, so that a resumed run draws the batches it would have drawn."""

    def __init__(self, tokens, batch_size: int, block_size: int, seed: int, device, rank: int = 0, world: int = 1):
        self.tokens, self.batch_size, self.block_size = tokens, batch_size, block_size
        self.rng, self.device, self.rank, self.world = np.random.default_rng(seed), device, rank, world

    def next(self, rng=None):
        """(x, y) (B, T) int64 on the device."""
        return get_batch(self.tokens, self.batch_size, self.block_size, self.rng if rng is None else rng, self.device, self.rank,
                         self.world)

    def peek(self):
        return self.next(copy.deepcopy(self.rng))


def val_starts(n_tokens: int, n_windows: int, block_size: int, seed: int = 1234) -> np.ndarray:
    """A fixed, seeded set of window starts (for batch_at), so that every run is scored on the same tokens."""
    _check_length(n_tokens, block_size, "the val split")
    return np.random.default_rng(seed).integers(0, n_tokens - block_size - 1, size=n_windows)


# -----------------------------------------------------------------------------
# Files: meta.json and its checks, the data folder, the text on disk or from the hub


# What the code reads from meta.json, and the JSON types it must have.
META_TYPES = {"source": str, "vocab": str, "max_train_mb": (int, float), "vocab_size": int, "eot_id": int,
              "train_tokens": int, "val_tokens": int, "gpt2_ids": (list, type(None))}


def rebuild_command(data_dir, meta: dict | None = None) -> str:
    """The data.py command that writes data_dir again, with meta's settings when they are known."""
    args = [f"--data_dir={data_dir}"]
    if meta is None:
        return f"python data.py {shlex.quote(args[0])} plus the --source, --vocab and --max_train_mb it was made with"
    default = DataConfig()
    if meta["source"]:
        args.append(f"--source={meta['source']}")
    if meta["vocab"] != default.vocab:
        args.append(f"--vocab={meta['vocab']}")
    if meta["max_train_mb"] != default.max_train_mb:
        args.append(f"--max_train_mb={float(meta['max_train_mb'])!r}")
    return " ".join(["python data.py"] + [shlex.quote(a) for a in args])


def meta_problem(meta) -> str:
    """What makes a parsed meta.json unusable, or "" if nothing does."""
    if not isinstance(meta, dict):
        return f"holds a JSON {type(meta).__name__}, not an object"
    missing = [key for key in META_TYPES if key not in meta]
    if missing:
        return f"lacks {', '.join(missing)}"
    for key, types in META_TYPES.items():
        if isinstance(meta[key], bool) or not isinstance(meta[key], types):
            return f"has a {type(meta[key]).__name__} for {key}"
    if meta["vocab"] not in VOCABS:
        return f"has vocab {meta['vocab']!r}, not compact or gpt2"
    ids = meta["gpt2_ids"]
    if ids is not None and not all(type(i) is int and 0 <= i < GPT2_VOCAB_SIZE for i in ids):
        return f"has gpt2_ids outside 0..{GPT2_VOCAB_SIZE - 1}"
    n_ids = GPT2_VOCAB_SIZE if ids is None else len(ids) + 1  # the compact vocabulary adds <unk>
    if meta["vocab_size"] != n_ids:
        return f"says vocab_size {meta['vocab_size']:,} but its gpt2_ids make {n_ids:,}"
    return ""


def load_meta(data_dir) -> dict:
    """meta.json of data_dir, checked to be whole: a damaged one is a StaleData error saying how to rebuild."""
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise DataError(f"no {path}; run `python data.py --data_dir={data_dir}` (add --source=PATH offline)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise DataError(f"cannot read {path} ({err.strerror or err})") from None
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        raise StaleData(f"{path} is not valid JSON (cut short or edited)", rebuild_command(data_dir)) from None
    if problem := meta_problem(meta):
        raise StaleData(f"{path} {problem}", rebuild_command(data_dir))
    return meta


def settings_changed(meta: dict, cfg: DataConfig) -> str:
    """'vocab: gpt2 -> compact, ...' for each setting that differs between meta's files and cfg; "" if none."""
    now = {"source": source_key(cfg.source), "vocab": cfg.vocab, "max_train_mb": float(cfg.max_train_mb)}
    shown = {"source": lambda s: s or "(download)"}
    return ", ".join(f"{key}: {shown.get(key, str)(meta[key])} -> {shown.get(key, str)(value)}"
                     for key, value in now.items() if meta[key] != value)


def make_data_dir(data_dir: str) -> Path:
    """The --data_dir folder, made if missing; a one-line DataError if it cannot be a folder."""
    out = Path(data_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"--data_dir={data_dir} is a file, not a folder; pass a folder (it is made if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"--data_dir={data_dir}: cannot make that folder ({err.strerror or err}); "
                        "choose another") from None
    return out


def source_key(source: str) -> str:
    """--source as meta.json records it: absolute, so another spelling of the same path still matches."""
    return str(Path(source).expanduser().resolve()) if source else ""


def write_error(out: Path, err: OSError) -> DataError:
    return DataError(f"could not write the token files in {out} ({err.strerror or err}"
                     f"{'; free some space' if err.errno in (errno.ENOSPC, errno.EDQUOT) else ''}); rerun to prepare them")


def _one_line(err) -> str:
    return " ".join(str(err).split())


def find_source_files(source: str) -> dict:
    """Local text files by split, told apart by name: {"train": [...], "val": [...]} ("val" may be empty)."""
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise DataError(f"--source {path} does not exist; pass a TinyStories .txt/.txt.gz file or a folder of them")
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith((".txt", ".txt.gz")))
        if not files:
            raise DataError(f"--source folder {path} holds no .txt or .txt.gz files; put TinyStories-train.txt "
                            "(and TinyStories-valid.txt) there, or pass the file itself")
    val = [p for p in files if _is_val_name(p.name)]
    rest = [p for p in files if p not in val]
    train = [p for p in rest if "train" in p.name.lower()] or rest  # unnamed files count only if none says train
    if not train:
        raise DataError(f"--source {path} has only validation text ({', '.join(p.name for p in val)}); "
                        "add a train file, e.g. TinyStories-train.txt")
    return {"train": train, "val": val}


def _is_val_name(name: str) -> bool:
    name = name.lower()
    return "valid" in name or re.search(r"(?<![a-z])val(?![a-z])", name) is not None


def _decode(raw: bytes) -> tuple[str, int]:
    """raw as text, each invalid UTF-8 sequence replaced by U+FFFD exactly as decode("utf-8", "replace")
    does, and the number of bytes that were not valid UTF-8."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        escaped = raw.decode("utf-8", "surrogateescape")  # each invalid byte becomes one of U+DC80..U+DCFF
        n_bad = sum(1 for c in escaped if "\udc80" <= c <= "\udcff")
        return raw.decode("utf-8", "replace"), n_bad


def _read_error(path: Path, err: Exception) -> str:
    if isinstance(err, (gzip.BadGzipFile, EOFError, zlib.error)):
        return (f"{path} is not a whole gzip file ({_one_line(err) or type(err).__name__}); it is corrupt or "
                "cut short: get a complete copy, or pass the unpacked .txt")
    return f"cannot read {path} ({_one_line(getattr(err, 'strerror', None) or err)})"


def download(name: str, raw_dir: Path, max_bytes: int = 0, base_url: str | None = None) -> Path:
    """Fetch base_url/name into raw_dir/name via name.part, which a rerun resumes with an HTTP Range request.

    max_bytes > 0 fetches only the first max_bytes, cut back to the end of the last complete story.
    """
    url = f"{(base_url or os.environ.get('TINYSTORIES_URL', TINYSTORIES_URL)).rstrip('/')}/{name}"
    dest = raw_dir / (name.replace(".txt", f".first{max_bytes}B.txt") if max_bytes else name)
    if dest.exists():
        return dest
    raw_dir.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if not (max_bytes and have >= max_bytes):
        _fetch(url, part, have, max_bytes)
    if max_bytes and part.stat().st_size >= max_bytes:
        _cut_after_last_story(part)
    os.replace(part, dest)  # only a complete file ever gets the final name
    return dest


def _fetch(url: str, part: Path, have: int, max_bytes: int):
    """Append the bytes of url from offset `have` (up to max_bytes, if set) to part, with a progress bar."""
    request = urllib.request.Request(url)
    if have or max_bytes:
        request.add_header("Range", f"bytes={have}-{max_bytes - 1 if max_bytes else ''}")
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing lies past `have`: the .part is already whole
            return
        raise DataError(f"could not download {url} (HTTP {err.code}); {NO_NET_HINT}") from None
    except OSError as err:  # URLError (no network, refused, DNS) is an OSError
        raise DataError(f"could not download {url} ({_one_line(getattr(err, 'reason', err))}); {NO_NET_HINT}") from None
    if response.status != 206:
        have = 0  # the server ignored Range and sends the whole file: start over
    total = have + int(response.headers.get("Content-Length") or 0)
    with response, open(part, "ab" if have else "wb") as f, \
            tqdm(total=min(total, max_bytes or total) or None, initial=have, unit="B", unit_scale=True, disable=None,
                 desc=part.name.removesuffix(".part")) as bar:
        try:
            while chunk := response.read(MB):
                chunk = chunk[:max_bytes - f.tell()] if max_bytes else chunk
                if not chunk:
                    break
                f.write(chunk)
                bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as err:
            raise DataError(f"download of {url} broke off ({_one_line(err)}); rerun to resume it") from None


def _cut_after_last_story(path: Path):
    """Truncate a file cut at an arbitrary byte so that it ends right after its last separator line."""
    data = path.read_bytes()
    end = data.rfind(EOT)
    if end < 0:
        raise DataError(f"the first {len(data)} bytes of {path} hold no complete story; raise --max_train_mb")
    end += len(EOT) + (data[end + len(EOT):end + len(EOT) + 1] == b"\n")
    with open(path, "r+b") as f:
        f.truncate(end)


# -----------------------------------------------------------------------------
# Command line: python data.py [--source=PATH] [--data_dir=data] [--vocab=compact|gpt2] [--max_train_mb=N];
# --help lists the flags with their defaults.


def main(argv=None) -> int:
    try:
        prepare(cli.parse(DataConfig(), sys.argv[1:] if argv is None else argv, __doc__))
    except cli.ConfigError as err:
        cli.fail(err, 2)
    except DataError as err:
        cli.fail(err, 1)
    except KeyboardInterrupt:
        print("data.py: interrupted; rerun to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
