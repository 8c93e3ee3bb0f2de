"""Every Triton kernel compiled to machine code ahead of time, for every autotune config, no GPU needed.

The interpreter runs Python, so it accepts code that the compiler rejects; and on a GPU the autotuner
compiles every config of a kernel the first time it meets a shape, so one config that does not compile
fails a run there, in a lent machine's few minutes. So each config of each kernel is compiled as the
project launches it:
  sm90 (Hopper, the lent H200)  in bf16 (what --dtype=auto's autocast gives the kernels: training, bench.py)
                                and float32 (the kernel tests on a GPU, sampling, --dtype=float32)
  sm75 (a T4)                   in fp16, its autocast dtype (it has no bf16). --kernels=auto keeps GPUs below
                                sm80 on the references (kernels.unsupported: tl.dot lowers to FMA there), so
                                this shows only that the kernels compile for them.
with the constexprs of the --preset=gpu model and of bench.py --kernels. Each config's shared memory is
checked against the chip's: a config that does not fit is skipped by the autotuner, but at least one
per kernel must fit, or nothing can launch.

Run as a script it prints a line per compile (--capabilities, --dtypes, --jobs). .ci/run also runs it for
sm90 in bf16 and float32 under the lent machine's triton version, installed from the registry into a folder
of its own and put first on PYTHONPATH (never into the venv).
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# Shared memory a block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin): 227 KB on sm90, 64 KB on sm75.
SHARED_MEMORY = {90: 232448, 75: 65536}
DTYPES = {90: ("bf16", "fp32"), 75: ("fp16",)}
# pointer arguments by name: integer ids and schedules, and float32 buffers whatever the model's dtype
POINTER_TYPES = {"context_ptr": "*i64", "multipliers_ptr": "*i64", "head_primes_ptr": "*i64",
                 "head_offsets_ptr": "*i64", "head_orders_ptr": "*i32", "tile_expert_ptr": "*i32",
                 "tile_start_ptr": "*i32", "tile_end_ptr": "*i32", "offsets_ptr": "*i32", "rows_ptr": "*i64",
                 "grad_table_ptr": "*fp32", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32"}
FLOAT_ARGS = {"scale_log2e"}  # the other scalars are i32
# tl.dot's input_precision for float32 operands (kernels._dot_precision: TF32 only if torch's matmuls use it)
PRECISION = {"bf16": "ieee", "fp16": "ieee", "fp32": "ieee"}


def launches(kernels, dtype):
    """[(kernel name, constexprs)] as the project launches each kernel: the --preset=gpu model's shapes (Engram
    head_dim 64, MLA kv_lora_rank 128 and rope 32), and in bf16 (bench.py --kernels' dtype on an H200) bench.py's
    (Engram head_dim 32, MLA 512 and 64: DeepSeek-V2's) too."""
    backward_t = getattr(kernels, "ENGRAM_BACKWARD_BLOCK_T", 128)
    block_m = getattr(kernels, "GROUPED_BLOCK_M", 64)
    bench = dtype == "bf16"
    out = [("_engram_lookup_kernel", dict(MAX_ORDER=3, BLOCK_D=d)) for d in ((64, 32) if bench else (64,))]
    out.append(("_engram_lookup_backward_kernel", dict(MAX_ORDER=3, BLOCK_D=64, BLOCK_T=backward_t)))
    out.append(("_engram_rows_kernel", dict(MAX_ORDER=3, BLOCK_T=backward_t)))
    # training's (inference leaves out the stores of the pre-activations: SAVE_PREACT=False, less code)
    out.append(("_grouped_swiglu_up_kernel", dict(SAVE_PREACT=True, BLOCK_M=block_m)))
    # the down projection (act @ W2^T), and the input gradient (dgate @ W1 + dup @ W3)
    out.append(("_grouped_gemm_kernel", dict(TRANS_B=True, HAS_SECOND=False, BLOCK_M=block_m)))
    out.append(("_grouped_gemm_kernel", dict(TRANS_B=False, HAS_SECOND=True, BLOCK_M=block_m)))
    out.append(("_grouped_swiglu_backward_kernel", dict(BLOCK_M=block_m)))
    out.append(("_grouped_weight_grad_kernel", {}))
    mla = ((128, 32), (512, 64)) if bench else ((128, 32),)  # (BLOCK_C, BLOCK_R)
    out += [("_mla_decode_split_kernel", dict(BLOCK_C=c, BLOCK_R=r)) for c, r in mla]
    # a few splits and kernels.MAX_DECODE_SPLITS
    out += [("_mla_decode_combine_kernel", dict(BLOCK_SPLITS=s, BLOCK_C=64)) for s in ((16, 64) if bench else (64,))]
    return out


def jobs(capabilities, dtypes=None):
    """Every compile: (capability, dtype, kernel name, config index or None, constexprs). A kernel with
    no float operands compiles once per capability."""
    import kernels
    from triton.runtime.autotuner import Autotuner
    out, seen = [], set()
    for cap in capabilities:
        for dtype in DTYPES[cap]:
            if dtypes and dtype not in dtypes:
                continue
            for name, constexprs in launches(kernels, dtype):
                kernel = getattr(kernels, name, None)
                if kernel is None:  # compile_one reports it
                    out.append((cap, dtype, name, None, constexprs))
                    continue
                jit = kernel.fn if isinstance(kernel, Autotuner) else kernel
                if not any(a.endswith("_ptr") and a not in POINTER_TYPES for a in jit.arg_names):
                    if (cap, name) in seen:
                        continue
                    seen.add((cap, name))
                if "PRECISION" in jit.arg_names:
                    constexprs = {**constexprs, "PRECISION": PRECISION[dtype]}
                configs = range(len(kernel.configs)) if isinstance(kernel, Autotuner) else [None]
                out += [(cap, dtype, name, i, constexprs) for i in configs]
    return out


def compile_one(job):
    """Compile one job; returns (job, seconds, shared memory bytes, error text or '')."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner

    import kernels
    cap, dtype, name, index, constexprs = job
    kernel = getattr(kernels, name, None)
    if kernel is None:
        return job, 0.0, 0, f"kernels.py has no {name} (tests/test_kernel_compile.py names the kernels it compiles)"
    if isinstance(kernel, Autotuner):
        jit, config = kernel.fn, kernel.configs[index]
    else:  # launched with triton's defaults, or the warps kernels.py names
        jit = kernel
        config = triton.Config({}, num_warps=getattr(kernels, "ENGRAM_BACKWARD_WARPS", 4)
                               if "BLOCK_T" in constexprs else 4)
    constexprs = {**constexprs, **config.kwargs}
    signature = {}
    for arg in jit.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = POINTER_TYPES.get(arg, f"*{dtype}")
        else:
            signature[arg] = "fp32" if arg in FLOAT_ARGS else "i32"
    # as a launch with realistic shapes specialises: pointers and integers divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(jit.arg_names)
             if signature[arg] not in ("constexpr", "fp32")}
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(jit, signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", cap, 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages})
        shared = int(getattr(compiled.metadata, "shared", 0) or 0)
        error = ""
    except Exception as e:  # noqa: BLE001  every failure is reported, then the run fails
        shared, error = 0, f"{type(e).__name__}: {' '.join(str(e).split())[:2000]}"
    return job, time.perf_counter() - start, shared, error


def describe(job):
    cap, dtype, name, index, constexprs = job
    shape = " ".join(f"{k}={v}" for k, v in constexprs.items())
    return f"sm{cap} {dtype} {name} config {'-' if index is None else index} ({shape})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--capabilities", default="90,75", help="compute capabilities, comma separated")
    parser.add_argument("--dtypes", default="", help="only these (bf16, fp32, fp16), comma separated")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compiles at a time")
    args = parser.parse_args(argv)
    capabilities = [int(c) for c in args.capabilities.split(",")]
    import inspect

    import triton
    from triton.compiler import ASTSource

    import kernels
    assert not kernels.INTERPRET, "set TRITON_INTERPRET=0 before kernels.py is imported"
    # The ahead-of-time API changes between triton versions; this script writes the one of triton 3.6 to 3.9:
    # ASTSource(fn, signature {name: type}, constexprs {name: value}, attrs {(index,): [[attribute, value]]}).
    params = list(inspect.signature(ASTSource.__init__).parameters)[1:]
    if params[:2] != ["fn", "signature"] or not {"constexprs", "attrs"} <= set(params):
        print(f"triton {triton.__version__}: its ahead-of-time compiler takes ASTSource({', '.join(params)}), not the "
              "(fn, signature, constexprs, attrs) of triton 3.6 to 3.9 that this script writes; nothing compiled")
        return 2
    todo = jobs(capabilities, set(args.dtypes.split(",")) - {""})
    print(f"triton {triton.__version__}, python {sys.version.split()[0]}: {len(todo)} compiles for "
          f"{', '.join(f'sm{c}' for c in capabilities)}, {args.jobs} at a time", flush=True)
    start = time.perf_counter()
    if args.jobs > 1 and sys.platform == "linux":
        import multiprocessing
        # fork: the workers inherit the imported kernels (spawn would import torch again in each)
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            results = list(pool.imap_unordered(compile_one, todo))
    else:
        results = [compile_one(job) for job in todo]
    failed, fits = [], {}
    order = lambda r: (-r[0][0], str(r[0][1:3]), r[0][3] or 0, str(r[0][4]))  # noqa: E731  sm90 first, then by kernel
    for job, seconds, shared, error in sorted(results, key=order):
        cap, dtype, name = job[:3]
        fit = not error and shared <= SHARED_MEMORY[cap]
        fits[(cap, dtype, name)] = fits.get((cap, dtype, name), False) or fit
        over = f": over sm{cap}'s {SHARED_MEMORY[cap]}, the autotuner skips it"
        status = f"FAILED {error}" if error else f"{shared} B shared" + ("" if fit else over)
        print(f"{describe(job)}: {seconds:.1f} s, {status}")
        if error:
            failed.append(describe(job))
    # at least one config of each kernel must fit on Hopper (the others are skipped there)
    unfit = [f"sm{cap} {dtype} {name}" for (cap, dtype, name), ok in fits.items() if cap == 90 and not ok]
    print(f"{len(todo)} compiles in {time.perf_counter() - start:.0f} s: {len(failed)} failed"
          + (f"; no config fits in shared memory: {', '.join(unfit)}" if unfit else ""))
    return 1 if failed or unfit else 0


def compile_in_subprocess(capabilities, dtypes, tmp_path):
    """This file as a script in a fresh process: TRITON_INTERPRET=0 (real compiles, not the interpreter) and
    an empty Triton cache."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "triton-cache")}
    done = subprocess.run([sys.executable, str(Path(__file__)), f"--capabilities={capabilities}", f"--dtypes={dtypes}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    from scripts import skip_if_exercise
    skip_if_exercise(done.stdout + done.stderr)
    return done


def test_every_autotune_config_compiles_for_sm90_and_sm75(tmp_path):
    """sm90 in bf16 and sm75 in fp16, each config; float32 (sm90's slowest compiles: up to 18 s each) is
    compiled by .ci/run's job with the lent machine's triton, in the background of the tests."""
    pytest.importorskip("triton", reason="triton is not installed")
    pytest.importorskip("triton.compiler", reason="this triton has no ahead-of-time compiler API")
    import torch
    if torch.cuda.is_available():
        pytest.skip("on a GPU the kernel tests compile the kernels for real")
    done = compile_in_subprocess("90,75", "bf16,fp16", tmp_path)
    if done.returncode == 2:  # another ahead-of-time API (main says which)
        pytest.skip(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert " 0 failed" in done.stdout.splitlines()[-1]


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: real compiles
    sys.path[:0] = [str(ROOT), str(TESTS)]
    sys.exit(main())
