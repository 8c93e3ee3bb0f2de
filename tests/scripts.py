"""Running the project's scripts from the tests, and what a student copy (python exercises.py --out=...)
changes: a test that stops at an exercise the student has not written yet is a skip that names it,
whether it stopped in this process (tests/conftest.py) or in a child it ran (here)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDENT_COPY = (ROOT / "EXERCISES.json").is_file()  # exercises.py writes it into every student copy
# exercises.py --check=NAME names the exercise whose NotImplementedError must fail, not skip (a comma list)
CHECKING = set(os.environ.get("NANO_ENGRAM_EXERCISE", "").split(",")) - {""}
# an unwritten exercise in text: a traceback's last line, a repr, or Triton's compiler quoting the raise
UNWRITTEN = re.compile(r"""NotImplementedError(?::\s*|\(\s*["'])exercise ([\w-]+):""")


def exercise_of(error):
    """The unwritten exercise an exception stopped at: a NotImplementedError('exercise NAME: ...') it is, was
    raised from (Triton's interpreter wraps errors), or quotes (a child's stderr in an assert message)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        if isinstance(error, NotImplementedError) and text.startswith("exercise "):
            return text.split()[1].rstrip(":")
        if found := UNWRITTEN.search(text):
            return found.group(1)
        error = error.__cause__ or error.__context__
    return None


def needs(name) -> str:
    return f"needs exercise {name} (python exercises.py --check={name})"


def skip_reason(error=None, text="") -> str | None:
    """In a student copy, why a test that ended with this error (or this child output) is a skip: it
    reached an unwritten exercise other than the one being checked. None: it stands as it is."""
    if not STUDENT_COPY:
        return None
    name = exercise_of(error) if error is not None else (m.group(1) if (m := UNWRITTEN.search(text)) else None)
    return needs(name) if name and name not in CHECKING else None


def skip_if_exercise(stderr):
    """Call with a child's output once it ended: in a student copy, skip if it stopped at an unwritten exercise."""
    if reason := skip_reason(text=stderr or ""):
        pytest.skip(reason)


def run(script, *args, env_extra=None, timeout=300, unset=()):
    """python ROOT/script args... in ROOT, output captured as text: the CompletedProcess. env_extra is added
    to this process's environment, without the names in unset. In a student copy, a child that stopped
    at an unwritten exercise makes the test a skip."""
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update({"PYTHONUNBUFFERED": "1", **(env_extra or {})})
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)
    skip_if_exercise(proc.stderr)
    return proc
