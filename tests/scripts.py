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


def torchrun(script, *args, nproc=2, timeout=240, env_extra=None):
    """python -m torch.distributed.run --nproc_per_node=nproc ROOT/script args... on a free local port, one
    thread per rank: the CompletedProcess. A run still going after timeout seconds (a collective some rank
    never joined) is killed and fails the test with the last lines each rank printed, not a bare timeout."""
    import socket
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           str(ROOT / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"{script} on {nproc} ranks hung for {timeout} s (a rank waiting in a collective the others "
                    f"left?); its last output:\n{out[-1500:]}\n{err[-1500:]}", pytrace=False)
    skip_if_exercise(proc.stderr)
    return proc


def rank_errors(stderr: str) -> str:
    """For an assert message: each rank's exception line (torchrun prints its own traceback last, which
    would hide them), then the end of the output."""
    lines = [line for line in stderr.splitlines() if re.match(r"\[rank\d+\]:\s*\w*(Error|Exception|Interrupt)\b", line)]
    return "\n".join(lines + [stderr[-1500:]])
