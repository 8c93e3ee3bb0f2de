"""Tests for data.py: text -> tokens -> compact vocabulary -> memmaps -> batches, and the download path."""
import dataclasses
import json
import multiprocessing.pool
import re
import socket
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
import cli  # noqa: E402
import data  # noqa: E402
from data import (DataConfig, DataError, Tokenizer, get_batch, load_meta, load_or_prepare,  # noqa: E402
                  load_tokens, prepare, val_starts)

SHARED = REPO.parent / "shared"
from scripts import run  # noqa: E402
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
    return run("data.py", *args, env_extra=env, timeout=60)


def assert_one_line_error(stderr):
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1 and "error" in stderr


def test_cli_bad_source_exits_with_one_line(tmp_path):
    result = run_cli(f"--source={tmp_path / 'nope'}", f"--data_dir={tmp_path / 'd'}")
    assert result.returncode == 1
    assert_one_line_error(result.stderr)
    assert str(tmp_path / "nope") in result.stderr


@pytest.mark.parametrize("args", [["--bogus=1"], ["--vocab=small"], ["--max_train_mb", "lots"], ["--max_train_mb=-1"],
                                  ["--max_train_mb=nan"], ["--max_train_mb=inf"], ["--data_dir="],
                                  ["--source"], ["positional"], ["--sou=abbreviated"]])
def test_cli_bad_flags_exit_2_with_one_line(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        data.main(args)
    assert exit_.value.code == 2
    assert_one_line_error(capsys.readouterr().err)


def test_cli_accepts_both_flag_forms():
    assert cli.parse(DataConfig(), ["--source", "x", "--vocab=gpt2", "--max_train_mb=1.5"], data.__doc__) == \
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


def test_cli_help_lists_every_flag_with_its_default():
    result = run_cli("--help")
    assert result.returncode == 0 and "Traceback" not in result.stderr
    for field in dataclasses.fields(DataConfig):
        assert f"--{field.name}={getattr(DataConfig(), field.name)} " in result.stdout


def test_cli_ctrl_c_keeps_its_message_and_exit_130(tmp_path, monkeypatch, capsys):
    def interrupted(cfg):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "prepare", interrupted)
    assert data.main([f"--data_dir={tmp_path / 'd'}"]) == 130
    assert capsys.readouterr().err.strip() == "data.py: interrupted; rerun to resume"


def test_cli_files_are_reused_with_the_default_settings(tmp_path, source, monkeypatch):
    # data.py and train.py share DataConfig's defaults (64 MiB), so train.py finds the files data.py wrote
    assert data.main([f"--source={source}", f"--data_dir={tmp_path / 'd'}"]) == 0
    monkeypatch.setattr(data, "prepare", lambda cfg: pytest.fail("prepared the same data twice"))
    assert load_or_prepare(DataConfig(data_dir=str(tmp_path / "d"), source=str(source)))["max_train_mb"] == 64.0


# -----------------------------------------------------------------------------
# Bad inputs: each one ends as a one-line error saying how to fix it, or as correct behaviour,
# and nothing that was on disk is lost


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def assert_one_line(err):
    assert "\n" not in str(err) and "Traceback" not in str(err)


@pytest.mark.parametrize("fields, flag", [
    ({"vocab": "small"}, "--vocab=small: expected compact or gpt2"),
    ({"max_train_mb": -1}, "--max_train_mb=-1"), ({"max_train_mb": float("nan")}, "--max_train_mb=nan"),
    ({"max_train_mb": float("inf")}, "--max_train_mb=inf"), ({"max_train_mb": "5"}, "--max_train_mb=5"),
    ({"data_dir": ""}, "--data_dir is empty")])
def test_config_rejects_bad_values_naming_the_flag(fields, flag):
    with pytest.raises(ValueError, match=re.escape(flag)) as err:
        DataConfig(**fields)
    assert_one_line(err.value)


def damage_file(path, how):
    """Spoil a prepared file the ways a crash, a full disk or another program would."""
    good = path.read_bytes()
    if how == "cut short":
        path.write_bytes(good[:len(good) // 4 * 2])
    elif how == "odd size":
        path.write_bytes(good + b"\0")
    elif how == "random bytes":   # as long as the real file, but ids far outside the vocabulary
        path.write_bytes(np.random.default_rng(0).integers(0, 2**16, len(good) // 2, dtype=np.uint16).tobytes())
    elif how == "missing":
        path.unlink()


@pytest.mark.parametrize("how, message", [("cut short", r"holds [\d,]+ tokens but .*meta.json says [\d,]+ \(cut short"),
                                          ("odd size", "has an odd size"), ("random bytes", "holds token id"),
                                          ("missing", "is missing")])
def test_load_tokens_checks_the_file_against_meta(tmp_path, source, how, message):
    d = tmp_path / "d"
    meta = prepare(DataConfig(data_dir=str(d), source=str(source)))
    damage_file(d / "train.bin", how)
    before = snapshot(d)
    with pytest.raises(DataError, match=message) as err:
        load_tokens(d, "train", meta)
    assert_one_line(err.value)
    assert str(d / "train.bin") in str(err.value)
    assert f"rebuild with python data.py --data_dir={d} --source={source.resolve()}" in str(err.value)
    assert len(load_tokens(d, "val", meta)) == meta["val_tokens"]    # the whole file passes
    assert snapshot(d) == before


def test_odd_sized_token_file_is_one_line_even_without_meta(tmp_path):
    (tmp_path / "train.bin").write_bytes(b"\1\0\2")
    with pytest.raises(DataError, match="odd size") as err:
        load_tokens(tmp_path, "train")
    assert_one_line(err.value)


@pytest.mark.parametrize("spoil, message", [
    (lambda text: text[:len(text) // 2], "is not valid JSON"),
    (lambda text: b"\xff\xfe" + text, "is not valid JSON"),
    (lambda text: b"[1, 2]", "holds a JSON list, not an object"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "train_tokens"}).encode(),
     "lacks train_tokens"),
    (lambda text: json.dumps({**json.loads(text), "vocab_size": "12"}).encode(), "has a str for vocab_size"),
    (lambda text: json.dumps({**json.loads(text), "gpt2_ids": [-1, 99999]}).encode(), "has gpt2_ids outside"),
    (lambda text: json.dumps({**json.loads(text), "vocab_size": 7}).encode(), "says vocab_size 7 but")])
def test_load_meta_rejects_a_damaged_meta_json(tmp_path, source, spoil, message):
    d = tmp_path / "d"
    prepare(DataConfig(data_dir=str(d), source=str(source)))
    (d / "meta.json").write_bytes(spoil((d / "meta.json").read_bytes()))
    before = snapshot(d)
    for load in (load_meta, Tokenizer.load):
        with pytest.raises(DataError, match=re.escape(f"{d / 'meta.json'} ") + message) as err:
            load(d)
        assert_one_line(err.value)
        assert f"rebuild with python data.py --data_dir={d}" in str(err.value)
    assert snapshot(d) == before


@pytest.mark.parametrize("name, how", [("meta.json", "cut short"), ("train.bin", "cut short"),
                                       ("val.bin", "random bytes"), ("val.bin", "missing")])
def test_load_or_prepare_rebuilds_damaged_files_saying_why(tmp_path, source, name, how, capsys):
    cfg = DataConfig(data_dir=str(tmp_path / "d"), source=str(source))
    first = load_or_prepare(cfg)
    files = snapshot(tmp_path / "d")
    damage_file(tmp_path / "d" / name, how)
    capsys.readouterr()
    meta = load_or_prepare(cfg)
    notes = [line for line in capsys.readouterr().out.splitlines() if "again" in line]
    assert len(notes) == 1 and notes[0].startswith(f"data: {tmp_path / 'd' / name} ")
    assert notes[0].endswith("; preparing the data again")
    volatile = ("created", "prepare_seconds")
    assert {k: v for k, v in meta.items() if k not in volatile} == {k: v for k, v in first.items() if k not in volatile}
    for split in ("train", "val"):
        assert (tmp_path / "d" / f"{split}.bin").read_bytes() == files[Path(f"{split}.bin")]


@pytest.mark.parametrize("change, note", [({"vocab": "gpt2"}, "vocab: compact -> gpt2"),
                                          ({"max_train_mb": 1}, "max_train_mb: 64.0 -> 1.0"),
                                          ({"source": "other"}, "source: {src} -> {other}")])
def test_load_or_prepare_says_which_setting_changed(tmp_path, source, change, note, capsys):
    other = tmp_path / "other"
    other.mkdir()
    for name in ("train.txt", "valid.txt"):
        (other / name).write_bytes((source / name).read_bytes())
    change = {k: str(other) if v == "other" else v for k, v in change.items()}
    load_or_prepare(DataConfig(data_dir=str(tmp_path / "d"), source=str(source)))
    capsys.readouterr()
    meta = load_or_prepare(DataConfig(**{"data_dir": str(tmp_path / "d"), "source": str(source), **change}))
    assert all(meta[k] == (str(other.resolve()) if k == "source" else v) for k, v in change.items())
    notes = [line for line in capsys.readouterr().out.splitlines() if "again" in line]
    assert notes == [f"data: {tmp_path / 'd'} was prepared with other settings "
                     f"({note.format(src=source.resolve(), other=other.resolve())}); preparing the data again"]


def test_data_dir_that_is_a_file_is_one_line_and_left_alone(tmp_path, source):
    notes = tmp_path / "data"
    notes.write_text("my notes")
    for call in (prepare, load_or_prepare):
        with pytest.raises(DataError, match=re.escape(f"--data_dir={notes} is a file, not a folder")) as err:
            call(DataConfig(data_dir=str(notes), source=str(source)))
        assert_one_line(err.value)
    result = run_cli(f"--data_dir={notes}", f"--source={source}")
    assert result.returncode == 1
    assert_one_line_error(result.stderr)
    assert notes.read_text() == "my notes"


@pytest.mark.parametrize("with_val_file", [True, False])
def test_text_that_is_not_utf8_becomes_u_fffd_with_one_warning_per_file(tmp_path, stories, with_val_file, capsys):
    src = tmp_path / "src"
    src.mkdir()
    text = "".join(f"\n{s}\n{EOT}\n" for s in stories["train"]).encode()
    raw = text.replace("café".encode(), "café".encode("latin-1"))          # é as one Latin-1 byte
    raw += f"\nA broken euro \xe2\x82 sign.\n{EOT}\n".encode("latin-1")     # a UTF-8 sequence cut short
    n_bad = raw.count("café".encode("latin-1")) + 2
    (src / "train.txt").write_bytes(raw)
    if with_val_file:
        write_stories(src / "valid.txt", stories["val"])
    before = snapshot(src)
    meta = prepare(DataConfig(data_dir=str(tmp_path / "d"), source=str(src), vocab="gpt2"))   # no <unk> in val
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [f"data: warning: {n_bad} bytes of {src.resolve() / 'train.txt'} are not valid UTF-8 and "
                        "became U+FFFD (convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8)"]
    replaced = [s.strip() for s in raw.decode("utf-8", "replace").split(EOT) if s.strip()]  # as before: U+FFFD
    tok = Tokenizer.from_meta(meta)
    got = tok.decode(np.concatenate([load_tokens(tmp_path / "d", split) for split in ("train", "val")]))
    want = replaced + [s.strip() for s in stories["val"]] if with_val_file else replaced
    assert got == "".join(s + EOT for s in want)
    assert snapshot(src) == before


def corrupt_gzip(gz: bytes, how: str) -> bytes:
    if how == "not gzip":
        return b"plain text, not gzip\n"
    if how == "cut short":
        return gz[:len(gz) // 2]
    spoiled = bytearray(gz)
    if how == "bad crc":
        spoiled[-6] ^= 0xFF                      # inside the CRC32 of the trailer
    else:                                        # "bad data": garbage in the middle of the deflate stream
        spoiled[len(gz) // 2:len(gz) // 2 + 20] = b"\xff" * 20
    return bytes(spoiled)


@pytest.mark.parametrize("how", ["not gzip", "cut short", "bad crc", "bad data"])
def test_corrupt_gzip_source_is_one_line_and_keeps_the_old_data(tmp_path, source, stories, how):
    d = tmp_path / "d"
    good = prepare(DataConfig(data_dir=str(d), source=str(source)))
    before = snapshot(d)
    bad = tmp_path / "bad"
    bad.mkdir()
    gz = write_stories(bad / "TinyStories-train.txt.gz", stories["train"])
    gz.write_bytes(corrupt_gzip(gz.read_bytes(), how))
    write_stories(bad / "TinyStories-valid.txt", stories["val"])
    with pytest.raises(DataError, match=re.escape(f"{gz.resolve()} is not a whole gzip file")) as err:
        prepare(DataConfig(data_dir=str(d), source=str(bad)))
    assert_one_line(err.value)
    assert snapshot(d) == before                 # the earlier files are whole and still in use
    assert load_or_prepare(DataConfig(data_dir=str(d), source=str(source))) == good


@pytest.mark.parametrize("plain, with_val_file", [("train.txt", True), ("valid.txt", True), ("train.txt", False)])
def test_source_without_separators_says_so(tmp_path, stories, plain, with_val_file):
    src = tmp_path / "src"
    src.mkdir()
    write_stories(src / "train.txt", stories["train"])
    if with_val_file:
        write_stories(src / "valid.txt", stories["val"])
    (src / plain).write_text("\n\n".join(stories["train"]), encoding="utf-8")   # stories, but no <|endoftext|>
    with pytest.raises(DataError) as err:
        prepare(DataConfig(data_dir=str(tmp_path / "d"), source=str(src)))
    assert_one_line(err.value)
    assert str(err.value).startswith(f"{src.resolve() / plain} has no <|endoftext|> separator at all: "
                                     "each story must end with a line holding only <|endoftext|>")


def test_get_batch_ranks_take_their_slices_of_one_global_batch(tmp_path):
    np.arange(500, dtype=np.uint16).tofile(tmp_path / "train.bin")
    tokens = load_tokens(tmp_path, "train")
    x, y = get_batch(tokens, 8, 16, np.random.default_rng(7), "cpu")
    parts = [get_batch(tokens, 4, 16, np.random.default_rng(7), "cpu", rank=rank, world=2) for rank in (0, 1)]
    assert all(px.shape == (4, 16) for px, _ in parts)
    assert torch.equal(torch.cat([px for px, _ in parts]), x) and torch.equal(torch.cat([py for _, py in parts]), y)


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
    meta = prepare(DataConfig(data_dir=str(tmp_path / "d"), max_train_mb=0))
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
    prepare(DataConfig(data_dir=str(tmp_path / "d"), max_train_mb=0))
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
