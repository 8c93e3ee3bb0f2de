import os
from pathlib import Path

import torch

# Without a GPU, Triton kernels run in its interpreter. Triton reads this variable when it is
# first imported, so it must be set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The shared data: tiktoken's GPT-2 BPE files for machines without internet, and TinyStories text. A
# shared/ folder inside the checkout comes first (git ignores it, and it is what travels to a lent GPU
# machine, see .ci/gpu), then the one beside the repo.
ROOT = Path(__file__).resolve().parents[1]


def shared(name):
    """ROOT/shared/name, else ROOT/../shared/name, whichever is a folder; None if neither is."""
    return next((base / name for base in (ROOT / "shared", ROOT.parent / "shared") if (base / name).is_dir()), None)


# the folder the tokenizer files come from (tests/test_exercises.py links it beside a student copy)
SHARED = shared("tiktoken").parent if shared("tiktoken") else ROOT.parent / "shared"
if shared("tiktoken"):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(shared("tiktoken")))

import pytest

TINYSTORIES = shared("tinystories")


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A prepared data dir for training tests: real TinyStories text (a slice of shared/tinystories, in the
    checkout or beside it) when present, else generated stories. Returns {'data_dir', 'source'}."""
    from data import DataConfig, prepare
    from stories import make_stories
    root = tmp_path_factory.mktemp("tinydata")
    src = root / "src"
    src.mkdir()
    if TINYSTORIES is not None:
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


# ----------------------------------------------------------------------------- student copies
# In a copy made by exercises.py --out, a test that reaches a function the student has not written yet
# (its NotImplementedError("exercise NAME: ...")) is a skip naming the exercise, so that the rest of the
# suite stays green while they work on one exercise; exercises.py --check=NAME makes NAME's own a failure.
# In the repo (no EXERCISES.json) these hooks change nothing.
from scripts import CHECKING, STUDENT_COPY, skip_reason  # noqa: E402

NEEDED = set()  # under --check: the other exercises that tests of the checked one could not pass without


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if not STUDENT_COPY:
        return
    reason = report.failed and call.excinfo is not None and skip_reason(call.excinfo.value)
    if reason:
        line = (item.reportinfo()[1] or 0) + 1  # 1-based, as pytest's own skips report it
        report.outcome, report.longrepr = "skipped", (str(item.path), line, f"Skipped: {reason}")
    if CHECKING and report.skipped and isinstance(report.longrepr, tuple) and "needs exercise " in report.longrepr[2]:
        NEEDED.add(report.longrepr[2].split("needs exercise ")[1].split()[0])


def pytest_terminal_summary(terminalreporter):
    if NEEDED:
        terminalreporter.write_line(f"exercise {', '.join(sorted(CHECKING))}: some of its tests need "
                                    f"{', '.join(sorted(NEEDED))} first, so it is not checked yet", red=True)


def pytest_sessionfinish(session, exitstatus):
    if NEEDED and exitstatus == 0:  # a check that had to skip tests of its exercise has not checked it
        session.exitstatus = 1
