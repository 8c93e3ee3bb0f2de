"""TinyStories data: get the text, tokenize it, write memmaps, serve batches.

`python data.py` (or train.py, through `load_or_prepare`, when the files are missing):
  1. text: download TinyStories-train.txt / -valid.txt from the Hugging Face hub into data_dir/raw
     (resumable .part files), or read local .txt/.txt.gz files given with --source.
  2. tokens: tiktoken "gpt2" on each stripped story, then one <|endoftext|> token after it.
  3. vocabulary: TinyStories uses only a few thousand of GPT-2's 50,257 tokens, so by default ("compact")
     we keep the ids seen in train, renumber them densely and map the rest to one <unk> id. That makes
     the embedding and output layer of a small model several times smaller and faster.
  4. files: train.bin / val.bin (uint16 model ids, read back as memmaps) and meta.json (counts, mapping).
Training then draws random windows from the memmaps with `get_batch`.
"""
import argparse
import gzip
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import tiktoken
import torch
from tqdm import tqdm

# The env var of the same name overrides it, so that tests can serve the files from a local http.server.
TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main"
HUB_FILES = {"train": "TinyStories-train.txt", "val": "TinyStories-valid.txt"}
SPLITS = ("train", "val")
EOT = b"<|endoftext|>"          # the separator line between stories in the text files
GPT2_VOCAB_SIZE, GPT2_EOT = 50257, 50256
HOLDOUT_FRACTION = 0.05         # share of the stories held out as val when the source has no val file
POOL_MIN_BYTES = 20 * 2**20      # below this, tokenize in-process: starting workers costs more than it saves
STORIES_PER_BATCH = 1024
MB = 2**20                       # --max_train_mb counts MiB
NO_NET_HINT = "pass --source=PATH with a local copy of TinyStories (a .txt/.txt.gz file or a folder of them)"


@dataclass
class DataConfig:
    data_dir: str = "data"        # where train.bin / val.bin / meta.json are written
    source: str = ""              # local file/folder of TinyStories text; "" = download from the hub
    vocab: str = "compact"        # "compact" | "gpt2"
    max_train_mb: float = 0.0     # 0 = whole train split


class DataError(Exception):
    """A data problem the user can fix; the message is one line saying how."""


def _one_line(err) -> str:
    return " ".join(str(err).split())


@lru_cache(maxsize=1)
def gpt2_encoding():
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as err:  # tiktoken downloads its BPE files on first use
        raise DataError(f"could not load the tiktoken gpt2 encoding ({_one_line(err)}); without internet, set "
                        "TIKTOKEN_CACHE_DIR to a folder holding its cached BPE files") from None


# -----------------------------------------------------------------------------
# The text: download from the hub, or find local files


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
            tqdm(total=min(total, max_bytes or total) or None, initial=have, unit="B", unit_scale=True,
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


def _is_val_name(name: str) -> bool:
    name = name.lower()
    return "valid" in name or re.search(r"(?<![a-z])val(?![a-z])", name) is not None


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


def iter_stories(paths, max_bytes: int = 0):
    """Yield each non-empty story, stripped; stories end at a <|endoftext|> separator.

    With max_bytes, stop before the first line that would pass it: the story it belongs to is dropped,
    so only complete stories are kept.
    """
    used = 0
    for path in paths:
        with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
            story = []
            for line in f:
                used += len(line)
                if max_bytes and used > max_bytes:
                    return
                *ended, rest = line.split(EOT)
                for piece in ended:
                    if text := b"".join(story + [piece]).decode("utf-8", "replace").strip():
                        yield text
                    story = []
                story.append(rest)
            if text := b"".join(story).decode("utf-8", "replace").strip():  # a last story with no separator
                yield text


def split_stories(files: dict, max_bytes: int):
    """(train stories, val stories, note): val from the val files, else the last 5% of the train stories."""
    if files["val"]:
        return iter_stories(files["train"], max_bytes), iter_stories(files["val"]), "val files"
    n = sum(1 for _ in iter_stories(files["train"], max_bytes))
    n_val = round(n * HOLDOUT_FRACTION)
    if n_val < 1:
        raise DataError(f"{files['train'][0]} has {n} stories, too few to hold out a val split; "
                        "add a file whose name contains 'valid'")
    note = f"held out the last {n_val} of {n} train stories as val (no val file)"
    print(f"data: {note}")
    return (islice(iter_stories(files["train"], max_bytes), n - n_val),
            islice(iter_stories(files["train"], max_bytes), n - n_val, None), note)


# -----------------------------------------------------------------------------
# Tokens: stories -> gpt2 ids -> model ids on disk


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
        with open(path, "wb") as f, tqdm(unit=" stories", desc=desc) as bar:
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
    with open(tmp, "wb") as f:
        for i in range(0, len(ids), 16 * MB):
            lookup[ids[i:i + 16 * MB]].tofile(f)
    del ids
    os.replace(tmp, dst)


def prepare(cfg: DataConfig) -> dict:
    """Get the text, tokenize it and write train.bin, val.bin and meta.json into cfg.data_dir; return meta."""
    t0 = time.time()
    if cfg.vocab not in ("compact", "gpt2"):
        raise DataError(f"vocab must be 'compact' or 'gpt2', not {cfg.vocab!r}")
    if not 0 <= cfg.max_train_mb < float("inf"):
        raise DataError(f"max_train_mb must be >= 0 (0 = all of train), not {cfg.max_train_mb}")
    out, max_bytes = Path(cfg.data_dir), int(cfg.max_train_mb * MB)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # an interrupted run must not leave old meta beside new bins
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
        for split in SPLITS:
            _write_mapped(tmp[split], out / f"{split}.bin", lookup)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)

    n_tokens = {split: int(counts[split].sum()) for split in SPLITS}
    val_unk = int(counts["val"][counts["train"] == 0].sum()) if unk_id is not None else 0
    meta = {
        "source": str(Path(cfg.source).expanduser().resolve()) if cfg.source else "",
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
    tmp_meta.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_meta, out / "meta.json")
    print(f"data: train {meta['train_stories']:,} stories, {n_tokens['train']:,} tokens; "
          f"val {meta['val_stories']:,} stories, {n_tokens['val']:,} tokens")
    if unk_id is not None:
        print(f"data: compact vocab {meta['vocab_size']:,} ids ({len(gpt2_ids):,} gpt2 ids seen in train + <unk>); "
              f"val tokens that became <unk>: {val_unk:,} ({100 * meta['val_unk_fraction']:.3f}%)")
    print(f"data: wrote {out}/train.bin, val.bin, meta.json in {meta['prepare_seconds']:.1f}s")
    return meta


def load_meta(data_dir) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise DataError(f"no {path}; run `python data.py --data_dir={data_dir}` (add --source=PATH offline)")
    return json.loads(path.read_text())


def load_or_prepare(cfg: DataConfig) -> dict:
    """Reuse the files in cfg.data_dir if they were made from the same source, vocab and size; else prepare."""
    out = Path(cfg.data_dir)
    if all((out / name).exists() for name in ("meta.json", "train.bin", "val.bin")):
        meta = load_meta(out)
        source = str(Path(cfg.source).expanduser().resolve()) if cfg.source else ""
        if (meta["source"], meta["vocab"], meta["max_train_mb"]) == (source, cfg.vocab, float(cfg.max_train_mb)):
            return meta
    return prepare(cfg)


# -----------------------------------------------------------------------------
# Tokenizer: text <-> model ids, through the compact mapping


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


# -----------------------------------------------------------------------------
# Batches for training and evaluation


def load_tokens(data_dir, split: str) -> np.memmap:
    path = Path(data_dir) / f"{split}.bin"
    if not path.exists() or path.stat().st_size == 0:
        raise DataError(f"no tokens in {path}; run `python data.py --data_dir={data_dir}` (add --source=PATH offline)")
    return np.memmap(path, dtype=np.uint16, mode="r")


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


def get_batch(tokens, batch_size: int, block_size: int, rng: np.random.Generator, device):
    """batch_size random windows of block_size + 1 tokens -> x, y (B, T) int64 on device."""
    filename = getattr(tokens, "filename", None)  # a memmap knows its file, which names the split
    _check_length(len(tokens), block_size, f"the {Path(filename).stem} split" if filename else "the token array")
    starts = rng.integers(0, len(tokens) - block_size - 1, size=batch_size)
    return batch_at(tokens, starts, block_size, device)


def val_starts(n_tokens: int, n_windows: int, block_size: int, seed: int = 1234) -> np.ndarray:
    """A fixed, seeded set of window starts (for batch_at), so that every run is scored on the same tokens."""
    _check_length(n_tokens, block_size, "the val split")
    return np.random.default_rng(seed).integers(0, n_tokens - block_size - 1, size=n_windows)


# -----------------------------------------------------------------------------
# Command line: python data.py [--source=PATH] [--data_dir=data] [--vocab=compact|gpt2] [--max_train_mb=N]


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, without argparse's usage block
        print(f"data.py: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _megabytes(value: str) -> float:
    try:
        mb = float(value)
    except ValueError:
        mb = -1.0
    if not 0 <= mb < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of MiB >= 0 (0 = all), not {value!r}")
    return mb


def parse_args(argv) -> DataConfig:
    parser = _ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                             allow_abbrev=False)
    parser.add_argument("--source", default="", help="local .txt/.txt.gz file or folder (default: download)")
    parser.add_argument("--data_dir", default="data", help="where train.bin, val.bin, meta.json go")
    parser.add_argument("--vocab", default="compact", choices=["compact", "gpt2"])
    parser.add_argument("--max_train_mb", type=_megabytes, default=0.0, help="use only the first N MiB of train")
    return DataConfig(**vars(parser.parse_args(argv)))


def main(argv=None) -> int:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        prepare(cfg)
    except DataError as err:
        print(f"data.py: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("data.py: interrupted; rerun to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
