import os
from pathlib import Path

import torch

# Without a GPU, Triton kernels run in its interpreter. Triton reads this variable when it is
# first imported, so it must be set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The shared folder beside the repo holds tiktoken's GPT-2 BPE files for machines without internet.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
if (SHARED / "tiktoken").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))

import pytest

TINYSTORIES = SHARED / "tinystories"


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A prepared data dir for training tests: real TinyStories text (a slice of ../shared)
    when present, else generated stories. Returns {'data_dir', 'source'}."""
    from data import DataConfig, prepare
    from stories import make_stories
    root = tmp_path_factory.mktemp("tinydata")
    src = root / "src"
    src.mkdir()
    if TINYSTORIES.is_dir():
        train_text = next(TINYSTORIES.glob("*train*.txt")).read_text(encoding="utf-8")
        valid_text = next(TINYSTORIES.glob("*valid*.txt")).read_text(encoding="utf-8")
        train_stories = train_text.split("<|endoftext|>")[:600]
        valid_stories = valid_text.split("<|endoftext|>")[:100]
    else:
        train_stories, valid_stories = make_stories(600, 0), make_stories(100, 1)
    for name, stories in (("train.txt", train_stories), ("valid.txt", valid_stories)):
        (src / name).write_text("".join(s.strip() + "\n<|endoftext|>\n" for s in stories if s.strip()), encoding="utf-8")
    data_dir = root / "data"
    prepare(DataConfig(data_dir=str(data_dir), source=str(src)))
    return {"data_dir": str(data_dir), "source": str(src)}
