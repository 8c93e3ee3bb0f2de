"""exercises.py: in the student copy it writes, every exercise's tests fail with its NotImplementedError
and message while the rest of the suite skips what it cannot run yet, naming the exercise; its table
points at real functions and tests that pass in the repo; its command line. (A student copy's own copy
of this file skips: these are checks of the repo.)"""
import ast
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import exercises
from conftest import SHARED
from scripts import STUDENT_COPY

ROOT = Path(__file__).resolve().parents[1]
ALL = [ex.name for ex in exercises.EXERCISES]
pytestmark = pytest.mark.skipif(STUDENT_COPY, reason="exercises.py is checked in the repo, not in a student copy")


def python(*args, cwd, env_extra=None, timeout=600):
    """python args... in cwd, output captured, outside any --check this run may be part of."""
    env = {k: v for k, v in os.environ.items() if k != exercises.CHECK_ENV}
    env.update({"PYTHONUNBUFFERED": "1", **(env_extra or {})})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def junit(path):
    """[(nodeid-like 'tests/test_x.py::test_y[param]', outcome, message)] from a junit xml file."""
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        module, name = case.get("classname"), case.get("name")
        nodeid = f"{module.replace('.', '/')}.py::{name}"
        result = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        message = "" if result is None else f"{result.get('message', '')}\n{result.text or ''}"
        out.append((nodeid, "passed" if result is None else result.tag, message))
    return out


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A student copy with every exercise blanked, at tmp/student beside tmp/shared (a link to ../shared)."""
    base = tmp_path_factory.mktemp("course")
    if SHARED.is_dir():
        (base / "shared").symlink_to(SHARED.resolve(), target_is_directory=True)
    proc = python("exercises.py", f"--out={base / 'student'}", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return base / "student"


# ----------------------------------------------------------------------------- the table, in the repo

def test_exercise_table_names_real_functions_and_collectable_tests():
    assert len(set(ALL)) == len(ALL) and all(re.fullmatch(r"[a-z0-9-]+", n) for n in ALL)
    tests = [t for ex in exercises.EXERCISES for t in ex.tests]
    assert len(set(tests)) == len(tests)  # one exercise per test: its failure names that one
    for ex in exercises.EXERCISES:
        assert ex.tests and ex.functions and "\n" not in ex.hint and '"' not in ex.hint, ex.name
        tree = ast.parse((ROOT / ex.file).read_text(encoding="utf-8"))
        for qualname in ex.functions:
            assert exercises.find_function(tree, qualname) is not None, f"{ex.name}: {ex.file} {qualname}"
    proc = python("-m", "pytest", "--collect-only", "-q", *tests, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    for test in tests:  # every id names at least one test (a parametrized one names all its cases)
        assert any(line == test or line.startswith(test + "[") for line in collected), test


def test_exercise_list_is_the_course_in_order():
    proc = python("exercises.py", "--list", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    positions = [out.index(f"  {name}") for name in ALL]
    assert positions == sorted(positions)
    for ex in exercises.EXERCISES:
        line = next(line for line in out.splitlines() if line.startswith(f"  {ex.name}"))
        assert ("[harder]" in line) == ex.harder and all(f in line for f in ex.functions)
        assert f"hint: {ex.hint}" in out and f"lab {ex.lab}" in out
        assert all(f"test: {t}" in out for t in ex.tests)


def test_exercise_check_passes_in_the_repo():
    proc = python("exercises.py", "--check=engram-gate", cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "1 passed" in proc.stdout and "exercise engram-gate: done" in proc.stdout


# ----------------------------------------------------------------------------- the student copy

def test_every_exercise_fails_in_the_student_copy_with_its_own_message(student, tmp_path):
    """All exercises' tests in one run, with every exercise 'being checked' so that none is skipped: each
    test fails with the NotImplementedError of its exercise or of an earlier one in the course (never a
    later one: --check works in course order), and each exercise has a test that fails with its own."""
    xml = tmp_path / "all.xml"
    tests = [t for ex in exercises.EXERCISES for t in ex.tests]
    proc = python("-m", "pytest", "-q", f"--junitxml={xml}", *tests, cwd=student,
                  env_extra={exercises.CHECK_ENV: ",".join(ALL)})
    assert proc.returncode == 1, proc.stdout[-3000:]
    cases = junit(xml)
    for i, ex in enumerate(exercises.EXERCISES):
        mine = [c for c in cases if any(c[0] == t or c[0].startswith(t + "[") for t in ex.tests)]
        assert mine, ex.name
        own = 0
        for nodeid, outcome, message in mine:
            if outcome == "skipped" and "exercise" not in message:
                continue  # e.g. no triton here: the test cannot run, blanked or not
            assert outcome == "failure", (nodeid, outcome, message[:500])
            named = re.search(r"NotImplementedError\W+exercise ([\w-]+): ", message)
            assert named and named.group(1) in ALL[:i + 1], (nodeid, message[:500])
            own += named.group(1) == ex.name
        skipped_for_other_reasons = all(outcome == "skipped" for _, outcome, _ in mine)
        assert own or skipped_for_other_reasons, f"no test of {ex.name} reaches it first"
        if own:
            assert f"exercise {ex.name}: {ex.hint}" in proc.stdout


def test_exercise_check_in_the_student_copy_fails_until_written(student):
    proc = python("exercises.py", "--check=rope", cwd=student)
    assert proc.returncode == 1
    rope = next(ex for ex in exercises.EXERCISES if ex.name == "rope")
    assert f"NotImplementedError: exercise rope: {rope.hint}" in proc.stdout
    assert "exercise rope: not yet" in proc.stdout
    # a later exercise: its own test fails, and those that need rope first are skipped, naming it; the
    # check fails even if nothing of its own had failed
    proc = python("exercises.py", "--check=mla-absorbed-decode", cwd=student)
    assert proc.returncode == 1
    assert "NotImplementedError: exercise mla-absorbed-decode: fold W^UK" in proc.stdout
    assert "needs exercise rope (python exercises.py --check=rope)" in proc.stdout
    assert "some of its tests need rope first" in proc.stdout


def test_exercise_copy_imports_everything_and_the_other_tests_skip(student, tmp_path):
    proc = python("-c", "import model, train, sample, compare, bench, data, kernels, mhc, exercises", cwd=student)
    assert proc.returncode == 0, proc.stderr
    xml = tmp_path / "rest.xml"
    proc = python("-m", "pytest", "-q", "-rs", f"--junitxml={xml}", "tests/test_data.py", "tests/test_model.py",
                  "tests/test_engram.py", "tests/test_mla.py",
                  "tests/test_bad_input.py::test_sigterm_saves_a_step_boundary_like_ctrl_c",  # Popen, waits on a file
                  "tests/test_bad_input.py::test_end_of_run_summary_and_loss_plot", cwd=student)  # run()
    assert proc.returncode == 0, proc.stdout[-4000:]
    outcomes = {}
    for nodeid, outcome, message in junit(xml):
        outcomes.setdefault(outcome, []).append((nodeid, message))
    assert set(outcomes) == {"passed", "skipped"} and len(outcomes["passed"]) > 20, proc.stdout[-3000:]
    assert all("needs exercise" in message for _, message in outcomes["skipped"] if "cuda" not in message.lower())
    for name in ("tokenizer-compression", "engram-hash", "rope"):
        assert f"needs exercise {name} (python exercises.py --check={name})" in proc.stdout
    in_children = [m for n, m in outcomes["skipped"] if "test_bad_input" in n]
    assert len(in_children) == 2 and all("needs exercise" in m for m in in_children)


# ----------------------------------------------------------------------------- the command line

def one_line_error(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as exit_info:
        exercises.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert all(f in err for f in fragments), err


def test_exercise_bad_flags_are_one_line_errors_that_write_nothing(tmp_path, capsys):
    one_line_error(capsys, [f"--out={tmp_path / 'a'}", "--only=rope,nonsense"], "nonsense", "--list")
    one_line_error(capsys, [f"--out={tmp_path / 'a'}", "--only=rop"], "did you mean rope")
    assert not (tmp_path / "a").exists()
    one_line_error(capsys, ["--check=nonsense"], "nonsense")
    one_line_error(capsys, ["--outt=x"], "--out")
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.py").write_text("keep me")
    one_line_error(capsys, [f"--out={full}"], "not empty")
    assert [p.name for p in full.iterdir()] == ["mine.py"] and (full / "mine.py").read_text() == "keep me"
    one_line_error(capsys, [f"--out={ROOT / 'student'}"], "inside the repo", "../student")
    assert not (ROOT / "student").exists()
    with pytest.raises(SystemExit) as exit_info:
        exercises.main(["--help"])
    assert exit_info.value.code == 0 and "--only=" in capsys.readouterr().out


def body_lines(source, qualname):
    """1-based line numbers of a function's body after its docstring."""
    fn = exercises.find_function(ast.parse(source), qualname)
    start = fn.body[0].end_lineno + 1 if ast.get_docstring(fn) is not None else fn.body[0].lineno
    return set(range(start, fn.end_lineno + 1))


def test_exercise_only_blanks_exactly_those_functions(tmp_path, capsys):
    out = tmp_path / "student"
    exercises.main([f"--out={out}", "--only=rope,engram-hash"])
    assert json.loads((out / exercises.MARKER).read_text())["exercises"] == ["rope", "engram-hash"]  # table order
    skipped = {".git", ".venv", "data", "__pycache__", ".pytest_cache"}
    repo_files = {p.relative_to(ROOT) for p in ROOT.rglob("*") if p.is_file()
                  and not skipped & set(p.relative_to(ROOT).parts) and not p.relative_to(ROOT).parts[0].startswith("out")}
    copy_files = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    assert copy_files == repo_files | {Path(exercises.MARKER)}
    blanked = {"mla.py": ("rope_cos_sin", "apply_rope"), "engram.py": ("hash_ngrams",)}
    for f in repo_files - set(map(Path, blanked)):
        assert (out / f).read_bytes() == (ROOT / f).read_bytes(), f
    hints = {ex.name: ex.hint for ex in exercises.EXERCISES}
    for f, functions in blanked.items():
        repo, copy = (ROOT / f).read_text(), (out / f).read_text()
        repo_body = set().union(*(body_lines(repo, q) for q in functions))
        copy_body = set().union(*(body_lines(copy, q) for q in functions))
        repo_lines, copy_lines = repo.splitlines(), copy.splitlines()
        # everything but the bodies, decorators, signatures and docstrings included, is byte for byte the same
        assert [l for i, l in enumerate(repo_lines, 1) if i not in repo_body] == \
               [l for i, l in enumerate(copy_lines, 1) if i not in copy_body]
        for q in functions:
            fn = exercises.find_function(ast.parse(copy), q)
            assert isinstance(fn.body[-1], ast.Raise) and all(isinstance(s, (ast.Expr, ast.Raise)) for s in fn.body)
            name = "rope" if f == "mla.py" else "engram-hash"
            assert ast.literal_eval(fn.body[-1].exc.args[0]) == f"exercise {name}: {hints[name]}"
        kept = [line for line in (copy_lines[i - 1].strip() for i in sorted(copy_body))
                if not line.startswith("raise NotImplementedError(")]  # all but the raises
        assert all(line.startswith("#") for line in kept)
        assert set(kept) <= {repo_lines[i - 1].strip() for i in repo_body}
    # full-line comments of a body stay (the scaffold), code and its trailing comments go
    full = tmp_path / "all"
    exercises.main([f"--out={full}"])
    mla = (full / "mla.py").read_text()
    assert "    # new token i sits at absolute position start_pos + i" in mla and "masked_fill" not in mla
    assert "raise NotImplementedError(\"exercise mla-absorbed-decode: " in mla
    assert "@triton.jit\ndef _engram_head_rows(" in (full / "kernels.py").read_text()
    capsys.readouterr()
