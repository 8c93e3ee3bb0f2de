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
    never joined) fails the test with what each rank was doing: the agent and the ranks are stopped
    (SIGSTOP), then each rank in turn gets SIGABRT and runs again, and Python's faulthandler
    (PYTHONFAULTHANDLER) prints its stack, which the message gives under the rank's number, before the
    last lines the run printed. Not a bare timeout, and nothing left running."""
    import signal
    import socket
    import tempfile
    import time
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           str(ROOT / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1",
           **(env_extra or {})}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:  # files, not pipes: readable while it runs
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stacks = []
            ranks = rank_pids(proc.pid)
            for pid in [proc.pid, *ranks.values()]:  # all frozen: no rank or agent reacts when one dies
                signal_if_alive(pid, signal.SIGSTOP)
            for rank, pid in sorted(ranks.items()):
                err.seek(0, os.SEEK_END)
                before = err.tell()
                signal_if_alive(pid, signal.SIGABRT)  # pending until it runs again
                signal_if_alive(pid, signal.SIGCONT)
                time.sleep(2)  # faulthandler writes the stack, then the rank dies
                err.seek(before)
                stacks.append(f"--- rank {rank} (pid {pid}) was here:\n{err.read()[-3000:]}")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out.seek(0)
            pytest.fail(f"{script} on {nproc} ranks hung for {timeout} s (a rank waiting in a collective the others "
                        f"left?)\n" + "\n".join(stacks) + f"\n--- its last output:\n{out.read()[-1500:]}", pytrace=False)
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
    skip_if_exercise(result.stderr)
    return result


def signal_if_alive(pid: int, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def rank_pids(agent: int) -> dict:
    """{rank: pid} of the worker processes a torchrun agent started (their RANK environment variable)."""
    ranks = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            if parent != agent:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            ranks[int(env[b"RANK"])] = int(entry)
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return ranks


def rank_errors(stderr: str) -> str:
    """For an assert message: each rank's exception line (torchrun prints its own traceback last, which
    would hide them), then the end of the output."""
    lines = [line for line in stderr.splitlines() if re.match(r"\[rank\d+\]:\s*\w*(Error|Exception|Interrupt)\b", line)]
    return "\n".join(lines + [stderr[-1500:]])
