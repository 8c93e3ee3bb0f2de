"""Tests for data.py: text -> tokens -> compact vocabulary -> memmaps -> batches, and the download path."""
import multiprocessing.pool
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import data  # noqa: E402
from data import (DataConfig, DataError, Tokenizer, get_batch, load_or_prepare, load_tokens,  # noqa: E402
                  prepare, val_starts)

SHARED = REPO.parent / "shared"
from stories import EOT, make_stories, write_stories  # noqa: E402
VAL_ONLY = "A quokka named Zyxwv ate durian on Kilimanjaro."   # words the train stories never use


@pytest.fixture(scope="module")
def enc():
    return tiktoken.get_encoding("gpt2")


@pytest.fixture
def stories():
    return {"train": make_stories(30, seed=0), "val": make_stories(8, seed=1) + [VAL_ONLY]}


@pytest.fixture
def source(tmp_path, stories):
    src = tmp_path / "src"
    src.mkdir()
    write_stories(src / "train.txt", stories["train"])
    write_stories(src / "valid.txt", stories["val"])
    return src


def expected_gpt2_ids(enc, stories):
    return [i for s in stories for i in enc.encode_ordinary(s) + [enc.eot_token]]


def test_tokenize_round_trip_one_separator_per_story(tmp_path, source, stories, enc):
    meta = prepare(DataConfig(data_dir=str(tmp_path / "d"), source=str(source)))
    tok = Tokenizer.load(tmp_path / "d")
    for split in ("train", "val"):
        ids = load_tokens(tmp_path / "d", split)
        assert ids.dtype == np.uint16
        assert int((ids == tok.eot_id).sum()) == len(stories[split]) == meta[f"{split}_stories"]
        assert len(ids) == meta[f"{split}_tokens"] == len(expected_gpt2_ids(enc, stories[split]))
        assert ids.tolist() == [i for s in stories[split] for i in tok.encode(s) + [tok.eot_id]]
    train = load_tokens(tmp_path / "d", "train")
    assert tok.decode(train) == "".join(s + EOT for s in stories["train"])   # multi-byte characters survive


def test_compact_vocab_maps_both_ways_and_unk(tmp_path, source, stories, enc, capsys):
    meta = prepare(DataConfig(data_dir=str(tmp_path / "d"), source=str(source)))
    tok = Tokenizer.from_meta(meta)
    in_train = set(expected_gpt2_ids(enc, stories["train"]))
    assert meta["gpt2_ids"] == sorted(in_train)                       # dense, in increasing gpt2 id order
    assert tok.vocab_size == meta["vocab_size"] == len(in_train) + 1
    assert tok.unk_id == meta["unk_id"] == len(in_train)
    assert tok.gpt2_ids[tok.eot_id] == enc.eot_token

    text = stories["train"][0]
    ids = tok.encode(text)
    assert [int(tok.gpt2_ids[i]) for i in ids] == enc.encode_ordinary(text)   # compact -> gpt2
    assert tok.decode(ids) == text
    assert b"".join(tok.token_bytes()[i] for i in ids) == text.encode()
    assert len(tok.token_bytes()) == tok.vocab_size and tok.token_bytes()[tok.unk_id] == b"<unk>"

    # a val-only sentence: tokens unseen in train become <unk>, which decodes as the text "<unk>"
    val_only = enc.encode_ordinary(VAL_ONLY)
    assert any(g not in in_train for g in val_only)
    ids = tok.encode(VAL_ONLY)
    assert [i == tok.unk_id for i in ids] == [g not in in_train for g in val_only]
    expected = b"".join(enc.decode_single_token_bytes(g) if g in in_train else b"<unk>" for g in val_only)
    assert tok.decode(ids) == expected.decode("utf-8", errors="replace")

    val_ids = expected_gpt2_ids(enc, stories["val"])
    n_unk = sum(g not in in_train for g in val_ids)
    assert int((load_tokens(tmp_path / "d", "val") == tok.unk_id).sum()) == meta["val_unk_tokens"] == n_unk
    assert meta["val_unk_fraction"] == pytest.approx(n_unk / len(val_ids))
    assert f"{100 * n_unk / len(val_ids):.3f}%" in capsys.readouterr().out


def test_gpt2_vocab_keeps_every_id(tmp_path, source, stories, enc):
    meta = prepare(DataConfig(data_dir=str(tmp_path / "d"), source=str(source), vocab="gpt2"))
    tok = Tokenizer.from_meta(meta)
    assert tok.vocab_size == meta["vocab_size"] == enc.n_vocab and tok.unk_id is None
    assert tok.eot_id == enc.eot_token and meta["val_unk_tokens"] == 0
    for split in ("train", "val"):
        assert load_tokens(tmp_path / "d", split).tolist() == expected_gpt2_ids(enc, stories[split])
    assert tok.decode(tok.encode(VAL_ONLY)) == VAL_ONLY
    assert len(tok.token_bytes()) == enc.n_vocab


def test_folder_with_gzip_gives_the_same_tokens(tmp_path, source, stories):
    other = tmp_path / "gz"
    other.mkdir()
    write_stories(other / "TinyStories-train.txt.gz", stories["train"])
    write_stories(other / "TinyStories-valid.txt", stories["val"])
    (other / "README.md").write_text("not a story file")
    meta = prepare(DataConfig(data_dir=str(tmp_path / "a"), source=str(source)))
    meta_gz = prepare(DataConfig(data_dir=str(tmp_path / "b"), source=str(other)))
    assert [Path(p).name for p in meta_gz["files"]["train"]] == ["TinyStories-train.txt.gz"]
    assert meta_gz["gpt2_ids"] == meta["gpt2_ids"]
    for split in ("train", "val"):
        assert np.array_equal(load_tokens(tmp_path / "a", split), load_tokens(tmp_path / "b", split))


def test_single_file_without_split_name_holds_out_last_stories(tmp_path, stories, enc):
    all_stories = make_stories(40, seed=2)
    path = write_stories(tmp_path / "stories.txt", all_stories)
    meta = prepare(DataConfig(data_dir=str(tmp_path / "d"), source=str(path)))
    n_val = round(0.05 * len(all_stories))
    assert (meta["train_stories"], meta["val_stories"]) == (len(all_stories) - n_val, n_val)
    assert "held out" in meta["val_from"]
    tok = Tokenizer.from_meta(meta)
    assert tok.decode(load_tokens(tmp_path / "d", "val")) == "".join(s + EOT for s in all_stories[-n_val:])


def test_max_train_mb_keeps_only_complete_stories(tmp_path, source, stories):
    max_train_mb = 0.002
    limit = int(max_train_mb * 2**20)
    sizes = np.cumsum([len(f"\n{s}\n{EOT}\n".encode()) for s in stories["train"]])
    n_fit = int((sizes <= limit).sum())     # stories whose text and separator lie within the first `limit` bytes
    assert 0 < n_fit < len(stories["train"])
    meta = prepare(DataConfig(data_dir=str(tmp_path / "d"), source=str(source), max_train_mb=max_train_mb))
    assert meta["train_stories"] == n_fit and meta["val_stories"] == len(stories["val"])
    tok = Tokenizer.from_meta(meta)
    assert tok.decode(load_tokens(tmp_path / "d", "train")) == "".join(s + EOT for s in stories["train"][:n_fit])


def test_pool_tokenization_matches_in_process(tmp_path, source, monkeypatch):
    prepare(DataConfig(data_dir=str(tmp_path / "a"), source=str(source)))
    pools = []

    class RecordingPool(multiprocessing.pool.Pool):
        def imap(self, *args, **kwargs):
            pools.append(self)
            return super().imap(*args, **kwargs)

    monkeypatch.setattr(data, "Pool", RecordingPool)
    monkeypatch.setattr(data, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(data, "STORIES_PER_BATCH", 4)
    prepare(DataConfig(data_dir=str(tmp_path / "b"), source=str(source)))
    assert pools   # the worker processes really ran
    for split in ("train", "val"):
        assert np.array_equal(load_tokens(tmp_path / "a", split), load_tokens(tmp_path / "b", split))


def test_bad_sources_raise_data_error_naming_the_path(tmp_path, stories):
    missing, empty, only_val = tmp_path / "missing", tmp_path / "empty", tmp_path / "only_val"
    empty.mkdir()
    (empty / "notes.md").write_text("hello")
    only_val.mkdir()
    write_stories(only_val / "TinyStories-valid.txt", stories["val"])
    for path in (missing, empty, only_val):
        with pytest.raises(DataError, match=re.escape(str(path))) as err:
            prepare(DataConfig(data_dir=str(tmp_path / "d"), source=str(path)))
        assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="train"):
        prepare(DataConfig(data_dir=str(tmp_path / "d"), source=str(only_val)))


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, str(REPO / "data.py"), *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def assert_one_line_error(stderr):
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1 and "error" in stderr


def test_cli_bad_source_exits_with_one_line(tmp_path):
    result = run_cli(f"--source={tmp_path / 'nope'}", f"--data_dir={tmp_path / 'd'}")
    assert result.returncode != 0
    assert_one_line_error(result.stderr)
    assert str(tmp_path / "nope") in result.stderr


@pytest.mark.parametrize("args", [["--bogus=1"], ["--vocab=small"], ["--max_train_mb", "lots"], ["--max_train_mb=-1"],
                                  ["--source"], ["positional"], ["--sou=abbreviated"]])
def test_cli_bad_flags_exit_2_with_one_line(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        data.main(args)
    assert exit_.value.code == 2
    assert_one_line_error(capsys.readouterr().err)


def test_cli_accepts_both_flag_forms():
    assert data.parse_args(["--source", "x", "--vocab=gpt2", "--max_train_mb=1.5"]) == \
        DataConfig(source="x", vocab="gpt2", max_train_mb=1.5)


def test_load_or_prepare_reuses_only_matching_files(tmp_path, source, monkeypatch):
    cfg = DataConfig(data_dir=str(tmp_path / "d"), source=str(source))
    first = load_or_prepare(cfg)
    calls = []
    monkeypatch.setattr(data, "prepare", lambda c: calls.append(c) or {"vocab": c.vocab})
    monkeypatch.chdir(source.parent)   # a relative spelling of the same source still matches
    assert load_or_prepare(DataConfig(data_dir=str(tmp_path / "d"), source="src")) == first
    assert calls == []
    load_or_prepare(DataConfig(data_dir=str(tmp_path / "d"), source=str(source), vocab="gpt2"))
    load_or_prepare(DataConfig(data_dir=str(tmp_path / "d"), source=str(source), max_train_mb=1))
    assert len(calls) == 2


def test_get_batch_windows_in_range_and_shifted(tmp_path):
    n = 500
    np.arange(n, dtype=np.uint16).tofile(tmp_path / "train.bin")   # token value == its position
    tokens = load_tokens(tmp_path, "train")
    x, y = get_batch(tokens, 64, 16, np.random.default_rng(0), "cpu")
    assert x.shape == y.shape == (64, 16) and x.dtype == y.dtype == torch.int64
    starts = np.random.default_rng(0).integers(0, n - 16 - 1, size=64)
    assert torch.equal(x[:, 0], torch.from_numpy(starts))
    assert torch.equal(x, x[:, :1] + torch.arange(16))                # contiguous windows
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert x.min() >= 0 and y.max() < n


def test_short_split_raises_data_error(tmp_path):
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "val.bin")
    with pytest.raises(DataError, match=r"val split.*block_size"):
        get_batch(load_tokens(tmp_path, "val"), 4, 16, np.random.default_rng(0), "cpu")
    with pytest.raises(DataError, match="block_size"):
        val_starts(10, 4, 16)
    with pytest.raises(DataError, match="data.py"):
        load_tokens(tmp_path, "train")


def test_val_starts_fixed_and_in_range():
    a = val_starts(10_000, 50, 64, seed=1)
    assert np.array_equal(a, val_starts(10_000, 50, 64, seed=1))
    assert not np.array_equal(a, val_starts(10_000, 50, 64, seed=2))
    assert a.min() >= 0 and a.max() + 64 + 1 < 10_000


# -----------------------------------------------------------------------------
# Download, from a local http.server standing in for the Hugging Face hub


class HubHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.server.files.get(self.path.lstrip("/"))
        if body is None:
            return self.send_error(404)
        rng = self.headers.get("Range")
        self.server.requests.append((self.path.lstrip("/"), rng))
        start, end, status = 0, len(body), 200
        if rng and self.server.honour_range:
            first, last = re.fullmatch(r"bytes=(\d+)-(\d*)", rng).groups()
            start, end, status = int(first), min(len(body), int(last) + 1 if last else len(body)), 206
            if start >= len(body):
                return self.send_error(416)
        self.send_response(status)
        self.send_header("Content-Length", str(end - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
        self.end_headers()
        self.wfile.write(body[start:end])

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(source, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    server.files = {"TinyStories-train.txt": (source / "train.txt").read_bytes(),
                    "TinyStories-valid.txt": (source / "valid.txt").read_bytes()}
    server.requests, server.honour_range = [], True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("TINYSTORIES_URL", f"http://127.0.0.1:{server.server_address[1]}")
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("honour_range", [True, False])
def test_download_resumes_part_file(tmp_path, source, hub, honour_range):
    hub.honour_range = honour_range
    train = hub.files["TinyStories-train.txt"]
    raw = tmp_path / "d" / "raw"
    raw.mkdir(parents=True)
    (raw / "TinyStories-train.txt.part").write_bytes(train[:1000])    # an earlier, interrupted download
    meta = prepare(DataConfig(data_dir=str(tmp_path / "d")))
    assert ("TinyStories-train.txt", "bytes=1000-") in hub.requests
    assert ("TinyStories-valid.txt", None) in hub.requests
    assert (raw / "TinyStories-train.txt").read_bytes() == train      # resumed (or restarted), never doubled
    assert (raw / "TinyStories-valid.txt").read_bytes() == hub.files["TinyStories-valid.txt"]
    assert not list(raw.glob("*.part"))
    assert meta["source"] == ""
    local = prepare(DataConfig(data_dir=str(tmp_path / "local"), source=str(source)))
    assert meta["gpt2_ids"] == local["gpt2_ids"]
    for split in ("train", "val"):
        assert np.array_equal(load_tokens(tmp_path / "d", split), load_tokens(tmp_path / "local", split))


def test_download_keeps_a_whole_part_file(tmp_path, hub):
    train = hub.files["TinyStories-train.txt"]
    raw = tmp_path / "d" / "raw"
    raw.mkdir(parents=True)
    (raw / "TinyStories-train.txt.part").write_bytes(train)   # finished, but interrupted before the rename
    prepare(DataConfig(data_dir=str(tmp_path / "d")))
    assert ("TinyStories-train.txt", f"bytes={len(train)}-") in hub.requests   # answered 416
    assert (raw / "TinyStories-train.txt").read_bytes() == train


def test_download_max_train_mb_fetches_a_prefix_cut_at_a_story(tmp_path, hub):
    limit = int(0.002 * 2**20)
    meta = prepare(DataConfig(data_dir=str(tmp_path / "d"), max_train_mb=0.002))
    assert ("TinyStories-train.txt", f"bytes=0-{limit - 1}") in hub.requests
    train = hub.files["TinyStories-train.txt"]
    cut = train[:limit].rfind(EOT.encode()) + len(EOT) + 1
    assert Path(meta["files"]["train"][0]).read_bytes() == train[:cut]
    assert meta["train_stories"] == train[:cut].count(EOT.encode())


def test_offline_without_source_is_one_clear_error(tmp_path, monkeypatch):
    with socket.socket() as s:          # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("TINYSTORIES_URL", url)
    with pytest.raises(DataError, match=re.escape(f"{url}/TinyStories-train.txt")) as err:
        prepare(DataConfig(data_dir=str(tmp_path / "d")))
    assert "--source" in str(err.value)
    result = run_cli(f"--data_dir={tmp_path / 'd'}", env={"TINYSTORIES_URL": url})
    assert result.returncode == 1
    assert_one_line_error(result.stderr)
    assert "--source=PATH" in result.stderr


# -----------------------------------------------------------------------------
# The real TinyStories excerpts in ../shared, when present


@pytest.mark.skipif(not (SHARED / "tinystories").is_dir(), reason="no ../shared/tinystories")
def test_shared_tinystories(tmp_path):
    meta = prepare(DataConfig(data_dir=str(tmp_path / "d"), source=str(SHARED / "tinystories")))
    tok = Tokenizer.from_meta(meta)
    for split, pattern in (("train", "*train*.txt"), ("val", "*valid*.txt")):
        text = "".join(p.read_text(encoding="utf-8") for p in sorted((SHARED / "tinystories").glob(pattern)))
        n_stories = sum(1 for s in text.split(EOT) if s.strip())
        assert meta[f"{split}_stories"] == n_stories
        assert int((load_tokens(tmp_path / "d", split) == tok.eot_id).sum()) == n_stories
    # the point of the compact vocabulary: far fewer ids than gpt2, and few val tokens lost to <unk>
    assert tok.vocab_size < 50257 // 4
    assert 0 < meta["val_unk_fraction"] < 0.05
