"""Exercises: a copy of the repo in which chosen functions are left for you to write.

    python exercises.py --list                           # the exercises in course order: lab, hint, tests
    python exercises.py --out=../student                 # a copy with every exercise blanked
    python exercises.py --out=../student --only=rope,engram-hash
    cd ../student && python exercises.py --check=rope    # that exercise's tests; they pass once you wrote it

In the copy, each chosen function keeps its decorators, signature, docstring and the full-line comments
of its body (the shapes, the equation: the scaffold); its code becomes
raise NotImplementedError("exercise NAME: hint"). The model files carry no markers: the table below says
where each exercise lives. Put the copy beside the repo (../student): its tests look for ../shared
(TinyStories, tiktoken's files) beside it, as the repo's do. In the copy, a test that reaches an exercise
you have not written yet is skipped, naming it; --check=NAME shows NAME's NotImplementedError as a failure
until you write it, and fails while a test of it still needs an earlier exercise.
"""
import ast
import difflib
import io
import json
import os
import shutil
import subprocess
import sys
import tokenize
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import cli

HERE = Path(__file__).resolve().parent
MARKER = "EXERCISES.json"  # in a student copy: which exercises are blanked (tests/scripts.py looks for it)
CHECK_ENV = "NANO_ENGRAM_EXERCISE"  # --check sets it: that exercise's NotImplementedError fails, not skips

Exercise = namedtuple("Exercise", "name lab file functions tests hint harder", defaults=(False,))

# The course, in order. An exercise's tests may also run code of the exercises before it, never of those
# after it (tests/test_exercises.py checks this), so that --check works one exercise at a time.
EXERCISES = [
    Exercise("rope", "1: TinyStories and the GPT baseline", "mla.py", ("rope_cos_sin", "apply_rope"),
             ("tests/test_mla.py::test_apply_rope_matches_complex_rotation",
              "tests/test_mla.py::test_apply_rope_preserves_norm",
              "tests/test_mla.py::test_apply_rope_dot_product_depends_only_on_offset"),
             "angles = position * theta^(-2i/D); rotate each pair (x[i], x[i + D/2]) by its angle, in float32"),
    Exercise("tokenizer-compression", "2: Engram's memory", "engram.py", ("normalize_token", "build_canonical_ids"),
             ("tests/test_engram.py::test_compression_merges_variants_only",
              "tests/test_engram.py::test_compression_off_is_identity",
              "tests/test_engram.py::test_compression_on_gpt2_vocab"),
             "NFKC, then drop accents (NFD, no combining marks), lower-case, one space per whitespace run, "
             "strip; equal keys share a dense canonical id"),
    Exercise("engram-hash", "2: Engram's memory", "engram.py", ("hash_ngrams",),
             ("tests/test_kernels.py::test_hash_ngrams_is_the_xor_of_products_modulo_each_heads_prime",
              "tests/test_engram.py::test_hash_is_deterministic_and_matches_reference",
              "tests/test_engram.py::test_same_ngram_same_rows_at_any_position",
              "tests/test_engram.py::test_prefix_continues_the_sequence"),
             "XOR of c_{t-j} * m_j over each suffix N-gram, then mod each head's prime plus its offset: (B, T, H)"),
    Exercise("engram-gate", "3: Gating and the experiment", "engram.py", ("signed_sqrt", "context_gate"),
             ("tests/test_engram.py::test_context_gate_matches_the_formula",),
             "alpha = sigmoid(signed_sqrt(<k, h> / sqrt(d))), with |x| clamped at eps inside the square root"),
    Exercise("short-conv", "3: Gating and the experiment", "engram.py", ("ShortConv.forward",),
             ("tests/test_engram.py::test_short_conv_is_a_causal_dilated_depthwise_conv",
              "tests/test_engram.py::test_incremental_decoding_equals_full_forward",
              "tests/test_engram.py::test_causal_in_ids_and_hidden"),
             "norm, prepend the cached (or zero) past inputs, depthwise dilated conv, SiLU; "
             "cache the last self.context normed inputs"),
    Exercise("moe-dispatch", "4: DeepSeekMoE", "moe.py", ("dispatch_to_experts",),
             ("tests/test_moe.py::test_dispatch_to_experts_matches_a_loop_over_tokens",),
             "argsort the (token, choice) pairs by expert, run run_experts on the sorted rows, "
             "weight them and index_add them back to their tokens"),
    Exercise("moe-group-routing", "4: DeepSeekMoE", "moe.py", ("limit_to_best_groups", "route"),
             ("tests/test_moe.py::test_bias_changes_choice_not_weight_formula",
              "tests/test_moe.py::test_matches_per_token_reference",
              "tests/test_moe.py::test_idle_experts_are_fine"),
             "choose top-k of scores + bias within the best groups (-inf elsewhere); the weights come from "
             "the unbiased scores, normalised unless softmax"),
    Exercise("moe-bias-update", "4: DeepSeekMoE", "moe.py", ("MoE.update_bias",),
             ("tests/test_moe.py::test_update_bias_moves_each_expert_against_its_load",
              "tests/test_moe.py::test_counts_only_in_training_and_update_is_noop_without_counts",
              "tests/test_moe.py::test_bias_unchanged_when_gamma_is_zero",
              "tests/test_moe.py::test_bias_updates_balance_a_skewed_router"),
             "b += gamma * sign(mean load - load) from the counts (all-reduced under DDP), then reset them"),
    Exercise("mla-absorbed-decode", "5: MLA and the KV cache", "mla.py", ("MLA._attend_absorbed", "latent_attention"),
             ("tests/test_kernels.py::test_mla_decode_reference_is_mlas_absorbed_attention_for_one_token",
              "tests/test_mla.py::test_chunked_absorbed_decode_matches_explicit_kv",
              "tests/test_mla.py::test_token_by_token_decode_matches_full_forward"),
             "fold W^UK into the query and W^UV into the output; attend over the cached latents plus the "
             "rotary scores, query i seeing cache tokens s <= start_pos + i"),
    Exercise("kv-cache-generate", "5: MLA and the KV cache", "model.py", ("GPT.generate",),
             ("tests/test_model.py::test_greedy_generation_with_cache_equals_without",
              "tests/test_model.py::test_generation_from_a_one_token_prompt",
              "tests/test_model.py::test_generation_past_block_size_slides_a_window"),
             "prefill the last block_size tokens into a Cache, then feed one token a step; rebuild a full cache"),
    Exercise("sparse-optimizers", "6: Scalable memory and kernels", "model.py", ("GPT.configure_optimizers",),
             ("tests/test_model.py::test_sparse_tables_go_to_lazy_adam",
              "tests/test_model.py::test_optimizer_groups"),
             "custom_param_groups first (sparse ones to SparseAdam), then AdamW: decay matrices, not vectors"),
    Exercise("sparse-clip", "6: Scalable memory and kernels", "train.py", ("clip_grad_norm",),
             ("tests/test_train.py::test_clip_grad_norm_coalesces_a_sparse_gradient",
              "tests/test_sparse.py::test_sparse_and_dense_paths_take_the_same_step_on_touched_rows"),
             "coalesce a sparse gradient and let its values stand in; one norm over all, scale if max_norm > 0"),
    Exercise("triton-engram-rows", "6: Scalable memory and kernels", "kernels.py", ("_engram_head_rows",),
             ("tests/test_kernels.py::test_engram_lookup_matches_reference_exactly",
              "tests/test_kernels.py::test_engram_lookup_sparse_gradient_matches_reference"),
             "hash_ngrams for BLOCK_T tokens of one head with tl.load: the XOR over tl.static_range(MAX_ORDER), "
             "multiplier 0 past the head's order", harder=True),
    Exercise("mhc-sinkhorn", "7: mHC", "mhc.py", ("sinkhorn",),
             ("tests/test_mhc.py::test_mhc_sinkhorn_is_doubly_stochastic_and_converges",
              "tests/test_mhc.py::test_mhc_res_map_conserves_the_mean_over_streams"),
             "exp of the logits less their max, then iters times: divide by the column sums + eps, "
             "then by the row sums + eps"),
    Exercise("shard-requests", "8: Memory beyond one device", "memory.py", ("requests_by_owner",),
             ("tests/test_shard.py::test_requests_by_owner_groups_each_row_once_by_its_owner",
              "tests/test_shard.py::test_sharded_training_matches_replicated_with_one_world_th_of_the_table_per_rank"),
             "torch.unique with return_inverse; the owner of row r is r % world; a stable argsort by owner "
             "groups the rows; bincount(owner, minlength=world) counts them"),
]


@dataclass
class ExercisesConfig:
    out: str = "../student"  # write a student copy here, beside the repo (its tests look for ../shared)
    only: str = ""           # comma-separated exercises to blank; '' = all of them
    list: bool = False       # print the exercises in course order, with lab, hint and tests
    check: str = ""          # run this exercise's tests in this folder; exit with pytest's code


# ----------------------------------------------------------------------------- blanking a function

def find_function(tree, qualname):
    """The def of qualname ('ShortConv.forward') in a module's ast, or None."""
    node = tree
    for part in qualname.split("."):
        node = next((n for n in getattr(node, "body", []) if isinstance(n, (ast.ClassDef, ast.FunctionDef))
                     and n.name == part), None)
    return node if isinstance(node, ast.FunctionDef) else None


def comment_lines(source):
    """Line numbers (1-based) that hold only a comment. tokenize, not a regex: a '#' inside a string is no comment."""
    return {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT and not tok.line[:tok.start[1]].strip()}


def blank(source, qualname, message, where):
    """source with qualname's body replaced: decorators, signature, docstring and full-line comments
    stay; code lines go (with their trailing comments); a raise NotImplementedError(message) ends it."""
    fn = find_function(ast.parse(source), qualname)
    if fn is None:
        raise cli.ConfigError(f"{where} has no function {qualname}: the table in exercises.py is out of date")
    first = fn.body[0]
    if first.lineno == fn.lineno:
        raise cli.ConfigError(f"{where}: {qualname} is written on one line; it cannot be blanked by lines")
    has_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
    keep_to = first.end_lineno if has_doc else first.lineno - 1  # the last line kept as it is (1-based)
    lines, comments = source.splitlines(keepends=True), comment_lines(source)
    scaffold = [lines[i - 1] for i in range(keep_to + 1, fn.end_lineno + 1) if i in comments]
    indent = " " * first.col_offset
    raise_line = f"{indent}raise NotImplementedError({json.dumps(message, ensure_ascii=False)})\n"
    return "".join(lines[:keep_to] + scaffold + [raise_line] + lines[fn.end_lineno:])


def blanked_files(chosen):
    """{file: its source with the chosen exercises' functions blanked}, each re-parsed to prove it is Python."""
    out = {}
    for ex in chosen:
        source = out.get(ex.file) or (HERE / ex.file).read_text(encoding="utf-8")
        for qualname in ex.functions:
            source = blank(source, qualname, f"exercise {ex.name}: {ex.hint}", ex.file)
        out[ex.file] = source
    for file, source in out.items():
        try:
            ast.parse(source)
        except SyntaxError as e:
            raise cli.ConfigError(f"blanking {file} gave invalid Python (line {e.lineno}): {e.msg}") from None
    return out


# ----------------------------------------------------------------------------- the student copy

def choose(only):
    """The exercises --only names (all if empty), in course order; an unknown name is an error."""
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = [ex.name for ex in EXERCISES]
    for n in names:
        if n not in known:
            near = difflib.get_close_matches(n, known, n=1)
            raise cli.ConfigError(f"--only: no exercise {n!r}" + (f"; did you mean {near[0]}?" if near else
                                                                   " (python exercises.py --list)"))
    return [ex for ex in EXERCISES if not names or ex.name in names]


def skip_in_copy(folder, names):
    """What the copy leaves out: git, the virtualenv, prepared data and runs, caches."""
    top = Path(folder) == HERE
    return {n for n in names if n in ("__pycache__", ".pytest_cache", ".git")
            or top and (n in (".venv", "data") or n.startswith("out"))}


def git_commit():
    """(commit, whether the working tree differs from it), or (None, None) without git."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True, check=True).stdout  # noqa: E731
        return run("rev-parse", "HEAD").strip(), bool(run("status", "--porcelain").strip())
    except (OSError, subprocess.CalledProcessError):
        return None, None


def write_copy(out, chosen):
    """Copy the repo to out and blank the chosen exercises there. Everything is checked first, so an error
    writes nothing."""
    out = Path(out).resolve()
    if out == HERE or HERE in out.parents:
        raise cli.ConfigError(f"--out={out} is inside the repo; put the copy beside it, e.g. --out=../student")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise cli.ConfigError(f"--out={out} exists and is not empty; choose a new folder (nothing was written)")
    files = blanked_files(chosen)
    shutil.copytree(HERE, out, ignore=skip_in_copy, dirs_exist_ok=True)
    for file, source in files.items():
        (out / file).write_text(source, encoding="utf-8")
    commit, dirty = git_commit()
    marker = {"exercises": [ex.name for ex in chosen], "source": str(HERE), "commit": commit, "uncommitted_changes": dirty}
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return out


# ----------------------------------------------------------------------------- --list and --check

def print_list():
    blanked = set(json.loads((HERE / MARKER).read_text())["exercises"]) if (HERE / MARKER).is_file() else set()
    lab = None
    for ex in EXERCISES:
        if ex.lab != lab:
            lab = ex.lab
            print(f"\nlab {lab}")
        tags = (" [harder]" if ex.harder else "") + (" [to write]" if ex.name in blanked else "")
        print(f"  {ex.name}{tags}: {ex.file} {', '.join(ex.functions)}")
        print(f"      hint: {ex.hint}")
        for test in ex.tests:
            print(f"      test: {test}")
    print("\nrun one with: python exercises.py --check=NAME")


def check(name):
    """Run the exercise's tests here (the repo or a student copy); pytest's exit code."""
    ex = next((e for e in EXERCISES if e.name == name), None)
    if ex is None:
        choose(name)  # raises the error, with a suggestion
    print(f"exercise {ex.name} ({ex.file}: {', '.join(ex.functions)}): {len(ex.tests)} tests", flush=True)
    env = {**os.environ, CHECK_ENV: ex.name}
    code = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", *ex.tests], cwd=HERE, env=env).returncode
    print(f"exercise {ex.name}: " + ("done: its tests pass" if code == 0 else f"not yet (pytest exit code {code})"))
    return code


def main(argv=None):
    try:
        cfg = cli.parse(ExercisesConfig(), sys.argv[1:] if argv is None else argv, __doc__)
        if cfg.list:
            return print_list()
        if cfg.check:
            sys.exit(check(cfg.check))
        chosen = choose(cfg.only)
        out = write_copy(cfg.out, chosen)
        print(f"wrote {out} with {len(chosen)} exercises to write: {', '.join(ex.name for ex in chosen)}")
        print(f"next: cd {out} && python exercises.py --list, then python exercises.py --check={chosen[0].name}")
    except cli.ConfigError as e:
        cli.fail(e)
    except OSError as e:  # a disk or permission problem while copying
        cli.fail(f"--out={cfg.out}: {e.strerror or e}")


if __name__ == "__main__":
    main()
