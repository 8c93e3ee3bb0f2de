"""Tests for kernels.py: every Triton kernel against its PyTorch reference.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1), so the shapes
are tiny; they are chosen to cross block edges (the interpreter's blocks are 16 wide), leave
experts empty, and hash pad ids and ids near the int64 bound. On a GPU the same tests run the
compiled kernels.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton reads TRITON_INTERPRET when it is first imported (its own library functions are jit
# functions too), and kernels.py when it is. So it must be set before anything imports triton,
# including torch.utils.flop_counter and torch.compile: tests/conftest.py is the right place; this
# is the fallback when this file happens to be the first to import triton.
TRITON_IMPORTED_TOO_EARLY = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402  imports with or without triton
from engram import EngramConfig, hash_multipliers, head_table_sizes  # noqa: E402
import engram  # noqa: E402
import mla  # noqa: E402
from engram import hash_ngrams  # noqa: E402
from moe import expert_loop as grouped_swiglu  # noqa: E402


def on_torch(fn, *args, **kwargs):
    """fn, a model file's op, on its PyTorch path (the reference) whatever --kernels says."""
    mode, kernels.mode = kernels.mode, "torch"
    try:
        return fn(*args, **kwargs)
    finally:
        kernels.mode = mode


def engram_lookup_reference(*args, **kwargs):
    return on_torch(engram.lookup, *args, **kwargs)


def mla_decode_reference(q_latent, q_rope, kv_latent, k_rope, softmax_scale):
    """mla.latent_attention for one new token (the last of the cache): (B, H, d_c)."""
    return on_torch(mla.latent_attention, q_latent[:, None], q_rope[:, None], kv_latent, k_rope, softmax_scale,
                    kv_latent.shape[1] - 1)[:, 0]
from mla import MLA, MLAConfig  # noqa: E402
from scripts import skip_if_exercise  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402  (imports triton)


TRITON_RUNNABLE = kernels.HAVE_TRITON and (
    DEVICE == "cuda" or (kernels.INTERPRET and not TRITON_IMPORTED_TOO_EARLY))


@pytest.fixture
def triton_kernels(monkeypatch):
    """Every op runs its Triton kernel during the test (interpreted on the CPU); monkeypatch restores the mode."""
    pytest.importorskip("triton", reason="triton is not installed: only the PyTorch path can be tested")
    if not TRITON_RUNNABLE:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on "
                    "the CPU; set it in tests/conftest.py before anything imports triton")
    monkeypatch.setattr(kernels, "mode", "triton")


def seeded(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- dispatch

def test_set_mode_checks_the_kernels_flag_and_use_triton_resolves_it(monkeypatch):
    monkeypatch.setattr(kernels, "mode", kernels.mode)  # restored after the test
    kernels.set_mode("torch", DEVICE)
    assert kernels.use_triton(DEVICE) is False
    kernels.set_mode("auto", DEVICE)
    assert kernels.use_triton("cpu") is False  # never the (slow) interpreter by default
    if torch.cuda.is_available():
        assert kernels.use_triton("cuda") is kernels.HAVE_TRITON
    with pytest.raises(ValueError, match="--kernels"):
        kernels.set_mode("fast", DEVICE)
    assert kernels.mode == "auto"  # a rejected flag changes nothing
    if kernels.HAVE_TRITON and (DEVICE == "cuda" or kernels.INTERPRET):
        kernels.set_mode("triton", DEVICE)
        assert kernels.use_triton(DEVICE) is True
    elif kernels.HAVE_TRITON:  # a CPU model, kernels built for a GPU
        with pytest.raises(ValueError, match="need a CUDA GPU"):
            kernels.set_mode("triton", "cpu")


def test_without_triton_the_module_imports_and_no_op_picks_a_kernel(monkeypatch):
    """Load a second copy of kernels.py with `import triton` failing: it imports, every op stays on the model
    files' references, and --kernels=triton is refused in one line."""
    monkeypatch.setitem(sys.modules, "triton", None)  # None in sys.modules makes the import raise
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("kernels_without_triton", ROOT / "kernels.py")
    bare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bare)
    assert not bare.HAVE_TRITON and not bare.INTERPRET and bare.mode == "auto"
    with pytest.raises(ValueError, match="--kernels=triton: triton is not installed"):
        bare.set_mode("triton", "cpu")
    for op in bare.OPS:
        assert not bare.use_triton("cpu", op) and bare.plan("cpu")[op].startswith("torch")
    x, counts, w1, w3, w2 = moe_case([2, 0, 3])
    for a, b in zip(bare.grouped_tile_schedule(counts, 5, 16), kernels.grouped_tile_schedule(counts, 5, 16)):
        assert torch.equal(a, b)  # the schedule is plain PyTorch


# ----------------------------------------------------------------------------- 1. Engram lookup

def engram_case(seed, ngram_orders=(2, 3), B=2, T=21, prefix=None, rows_per_head=53, vocab=50000, layer=1):
    """One Engram layer's kernel arguments. The canonical ids are the token ids (no compression) and
    the pad id is vocab: a large vocabulary makes the ids (and so the products c * m, up to ~2**62)
    large. prefix (B, P) gives the left context, an id < 0 meaning pad; else it is all pads.
    head_dim 20 is not a power of two."""
    cfg = EngramConfig(engram_layers=(0, 1), ngram_orders=ngram_orders, engram_heads_per_order=2,
                       engram_dim_per_order=40, engram_rows_per_head=rows_per_head, engram_compress=False)
    primes = torch.tensor(head_table_sizes(cfg)[layer])  # (H,)
    offsets = primes.cumsum(0) - primes  # (H,) exclusive prefix sum: each head's first row
    multipliers = hash_multipliers(cfg, vocab)[layer]  # (max_order,)
    P = max(ngram_orders) - 1
    ids = torch.randint(0, vocab, (B, T), generator=seeded(seed))
    left = torch.full((B, P), vocab) if prefix is None else torch.where(prefix >= 0, prefix, vocab)
    context = torch.cat([left, ids], dim=1).to(DEVICE)  # (B, P+T)
    args = (multipliers.to(DEVICE), primes.to(DEVICE), offsets.to(DEVICE), ngram_orders, 2)
    n_rows = int(primes.sum())
    table = torch.randn(n_rows, 20, generator=seeded(seed + 1)).to(DEVICE)
    table[:, 0] = torch.arange(n_rows, dtype=torch.float32)  # column 0 names its row: exact in float32
    return context, args, table


@pytest.mark.parametrize("ngram_orders,T,prefix", [
    ((2, 3), 21, None),               # T not a multiple of the block; pad ids at the start
    ((1, 3), 16, None),               # order 1 and a gap in the orders; T exactly one block
    ((2, 3), 1, [[-1, -1], [7, 49999]]),  # a decode step: one token after < P real ids / big ids
])
def test_engram_lookup_matches_reference_exactly(triton_kernels, ngram_orders, T, prefix):
    if prefix is not None:
        prefix = torch.tensor(prefix)
    context, args, table = engram_case(seed=T, ngram_orders=ngram_orders, T=T, prefix=prefix)
    out = kernels.engram_lookup(context, *args, table)
    ref = engram_lookup_reference(context, *args, table)
    assert out.shape == ref.shape == (2, T, 4 * 20)
    assert torch.equal(out, ref)  # a gather copies: bit-exact
    assert torch.equal(out[..., ::20].long(), hash_ngrams(context, *args))  # every head's row index, exactly


def test_hash_ngrams_is_the_xor_of_products_modulo_each_heads_prime():
    context, args, _ = engram_case(seed=1, T=5)
    multipliers, primes, offsets = (a.tolist() for a in args[:3])
    rows = hash_ngrams(context, *args)  # (B, T, H), heads: two of order 2, then two of order 3
    c = context.tolist()
    for b, t in [(0, 0), (1, 4)]:  # c_t sits at column 2 + t
        for head, n in enumerate((2, 2, 3, 3)):
            mix = 0
            for j in range(n):
                mix ^= c[b][2 + t - j] * multipliers[j]
            assert rows[b, t, head] == mix % primes[head] + offsets[head]


def test_engram_lookup_gradient_accumulates_repeated_rows(triton_kernels):
    # 5-row heads: most (token, head) pairs share a row with others, so the atomics must add up
    context, args, table = engram_case(seed=3, B=3, T=19, rows_per_head=5)
    grad_out = torch.randn(3, 19, 80, generator=seeded(4)).to(DEVICE)
    table_k = table.clone().requires_grad_(True)
    table_r = table.clone().requires_grad_(True)
    (kernels.engram_lookup(context, *args, table_k) * grad_out).sum().backward()
    (engram_lookup_reference(context, *args, table_r) * grad_out).sum().backward()
    torch.testing.assert_close(table_k.grad, table_r.grad, rtol=1e-5, atol=1e-5)
    assert table_r.grad.abs().sum(dim=1).gt(0).sum() < table.shape[0]  # some rows untouched ...
    assert table_r.grad.abs().max() > grad_out.abs().max()  # ... and some hit more than once


def test_engram_reference_sparse_gradient_equals_the_dense_one():
    context, args, table = engram_case(seed=3, B=3, T=19, rows_per_head=5)
    grad_out = torch.randn(3, 19, 80, generator=seeded(4)).to(DEVICE)
    table_dense, table_sparse = table.clone().requires_grad_(True), table.clone().requires_grad_(True)
    (engram_lookup_reference(context, *args, table_dense) * grad_out).sum().backward()
    (engram_lookup_reference(context, *args, table_sparse, sparse=True) * grad_out).sum().backward()
    assert table_sparse.grad.is_sparse
    torch.testing.assert_close(table_sparse.grad.coalesce().to_dense(), table_dense.grad)


@pytest.mark.parametrize("B,T", [(3, 19), (2, 1)])  # T not a multiple of the block; a decode step
def test_engram_lookup_sparse_gradient_matches_reference(triton_kernels, B, T):
    context, args, table = engram_case(seed=T, B=B, T=T, rows_per_head=5)
    context[:, :3] = context[0, :3]  # the same first token everywhere: every head's first row repeats
    grad_out = torch.randn(B, T, 80, generator=seeded(4)).to(DEVICE)
    table_k, table_r = table.clone().requires_grad_(True), table.clone().requires_grad_(True)
    (kernels.engram_lookup(context, *args, table_k, sparse=True) * grad_out).sum().backward()
    (engram_lookup_reference(context, *args, table_r, sparse=True) * grad_out).sum().backward()
    assert table_k.grad.is_sparse and table_k.grad.shape == table.shape and table_k.grad.dtype == table.dtype
    assert table_k.grad._nnz() == B * T * 4  # one gradient row per (token, head): nothing table-sized
    grad_k, grad_r = table_k.grad.coalesce(), table_r.grad.coalesce()
    assert grad_k._nnz() < B * T * 4  # rows repeat, and coalescing added them up
    assert torch.equal(grad_k.indices(), grad_r.indices())
    torch.testing.assert_close(grad_k.values(), grad_r.values(), rtol=1e-5, atol=1e-5)


def test_engram_lookup_bytes_counts_ids_rows_and_output():
    context, args, table = engram_case(seed=0)
    out = engram_lookup_reference(context, *args, table)
    B, T, _ = out.shape
    assert kernels.engram_lookup_bytes(B * T, 4, 20, elem_bytes=4) == B * T * 8 + 2 * out.nbytes


# ----------------------------------------------------------------------------- 2. MoE grouped GEMM

def moe_case(counts, dim=24, inter=40, seed=0):
    """Rows sorted by expert and stacked expert weights; dim and inter cross the K/N blocks."""
    g = seeded(seed)
    E, M = len(counts), sum(counts)
    x = torch.randn(M, dim, generator=g)
    w1 = torch.randn(E, inter, dim, generator=g) / dim ** 0.5
    w3 = torch.randn(E, inter, dim, generator=g) / dim ** 0.5
    w2 = torch.randn(E, dim, inter, generator=g) / inter ** 0.5
    return [t.to(DEVICE) for t in (x, torch.tensor(counts), w1, w3, w2)]


def test_tile_schedule_covers_every_row_once():
    counts = [0, 5, 17, 33, 0, 16]
    expert, start, end, offsets = kernels.grouped_tile_schedule(torch.tensor(counts), sum(counts), block_m=16)
    offsets = offsets.tolist()
    assert offsets == [0, 0, 5, 22, 55, 55, 71]
    real = [(e, s, t) for e, s, t in zip(expert.tolist(), start.tolist(), end.tolist()) if s < t]
    assert len(real) == sum(-(-n // 16) for n in counts)  # ceil(count / block) tiles per expert, no more
    covered = torch.zeros(sum(counts), dtype=torch.long)
    for e, s, t in real:  # each tile lies in its own expert's segment, block-aligned from its start
        assert offsets[e] <= s and t == offsets[e + 1] and (s - offsets[e]) % 16 == 0
        covered[s:min(t, s + 16)] += 1
    assert covered.eq(1).all()


@pytest.mark.parametrize("counts", [
    [0, 5, 17, 33, 0],  # idle experts first and last, partial tiles, a segment of three tiles
    [0, 0, 1, 0],       # a single token
    [16, 0, 32],        # segments that are exact multiples of the interpreter's block
])
def test_grouped_swiglu_matches_reference_values_and_gradients(triton_kernels, counts):
    x, counts_t, w1, w3, w2 = moe_case(counts)
    leaves_k = [t.clone().requires_grad_(True) for t in (x, w1, w3, w2)]
    leaves_r = [t.clone().requires_grad_(True) for t in (x, w1, w3, w2)]
    y_k = kernels.moe_grouped_swiglu(leaves_k[0], counts_t, *leaves_k[1:])
    y_r = grouped_swiglu(leaves_r[0], counts_t, *leaves_r[1:])
    torch.testing.assert_close(y_k, y_r, rtol=1e-4, atol=1e-4)
    grad_y = torch.randn(y_r.shape, generator=seeded(1)).to(DEVICE)
    (y_k * grad_y).sum().backward()
    (y_r * grad_y).sum().backward()
    for name, a, b in zip(("x", "w1", "w3", "w2"), leaves_k, leaves_r):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=f"gradient of {name}")
    idle = [e for e, n in enumerate(counts) if n == 0]
    assert leaves_k[1].grad[idle].eq(0).all() and leaves_k[3].grad[idle].eq(0).all()  # idle experts: zero grads


def test_grouped_swiglu_without_grad_and_without_rows(triton_kernels):
    x, counts, w1, w3, w2 = moe_case([3, 0, 20])
    with torch.no_grad():  # the inference launch skips saving the pre-activations
        torch.testing.assert_close(kernels.moe_grouped_swiglu(x, counts, w1, w3, w2),
                                   grouped_swiglu(x, counts, w1, w3, w2), rtol=1e-4, atol=1e-4)
    x, counts, w1, w3, w2 = moe_case([0, 0])
    assert kernels.moe_grouped_swiglu(x, counts, w1, w3, w2).shape == (0, 24)


def test_grouped_swiglu_flops_match_a_flop_counter():
    x, counts, w1, w3, w2 = moe_case([4, 0, 9], seed=2)
    with FlopCounterMode(display=False) as forward_count:
        grouped_swiglu(x, counts, w1, w3, w2)
    with FlopCounterMode(display=False) as total_count:
        leaves = [t.requires_grad_(True) for t in (x, w1, w3, w2)]
        grouped_swiglu(leaves[0], counts, *leaves[1:]).sum().backward()
    M, dim, inter = 13, 24, 40
    assert kernels.moe_grouped_swiglu_flops(M, dim, inter) == forward_count.get_total_flops()
    assert kernels.moe_grouped_swiglu_flops(M, dim, inter, backward=True) == \
        total_count.get_total_flops() - forward_count.get_total_flops()


# ----------------------------------------------------------------------------- 3. MLA decode

def mla_case(seed, B=2, H=3, C=20, R=6, S=37):
    """H below the head block, C and R not powers of two."""
    g = seeded(seed)
    shapes = ((B, H, C), (B, H, R), (B, S, C), (B, S, R))
    return [torch.randn(*shape, generator=g).to(DEVICE) for shape in shapes]


@pytest.mark.parametrize("S,num_splits", [(1, None), (37, None), (37, 3), (100, 7), (100, 3)])
def test_mla_decode_matches_reference(triton_kernels, S, num_splits):
    # splits of 13/13/11, 15 x 6 + 10 and 34/34/32 tokens: shorter and longer than a block, uneven
    q, q_rope, kv, k_rope = mla_case(seed=S, S=S)
    out = kernels.mla_decode_attention(q, q_rope, kv, k_rope, 0.3, num_splits=num_splits)
    ref = mla_decode_reference(q, q_rope, kv, k_rope, 0.3)
    assert out.shape == ref.shape == (2, 3, 20) and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_mla_decode_reference_is_mlas_absorbed_attention_for_one_token(monkeypatch):
    """What MLA can swap in for T == 1: fold W^UK into the query, attend, apply W^UV."""
    torch.manual_seed(0)
    cfg = MLAConfig(kv_lora_rank=20, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=10)
    layer = MLA(32, 3, cfg, 10000.0).to(DEVICE)
    B, S, H = 2, 9, 3
    q_nope, q_rope = torch.randn(B, 1, H, 8, device=DEVICE), torch.randn(B, 1, H, 6, device=DEVICE)
    kv, k_rope = torch.randn(B, S, 20, device=DEVICE), torch.randn(B, S, 6, device=DEVICE)
    expected = layer._attend_absorbed(q_nope, q_rope, kv, k_rope, start_pos=S - 1)  # (B, 1, H, d_v)

    w = layer.wkv_b.weight.view(H, 8 + 10, 20)
    w_uk, w_uv = w.split([8, 10], dim=1)
    q_latent = torch.einsum("bhd,hdc->bhc", q_nope[:, 0], w_uk)  # (B, H, d_c)
    modes = ["torch"] + (["triton"] if TRITON_RUNNABLE else [])
    for mode in modes:
        monkeypatch.setattr(kernels, "mode", mode)
        y_latent = mla.latent_attention(q_latent[:, None], q_rope, kv, k_rope, layer.softmax_scale, S - 1)[:, 0]
        y = torch.einsum("bhc,hdc->bhd", y_latent, w_uv)[:, None]  # (B, 1, H, d_v)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5, msg=f"mode={mode}")


def test_mla_decode_bytes_counts_cache_queries_and_output():
    q, q_rope, kv, k_rope = mla_case(seed=0, S=11)
    out = mla_decode_reference(q, q_rope, kv, k_rope, 0.3)
    moved = sum(t.nbytes for t in (q, q_rope, kv, k_rope, out))
    assert kernels.mla_decode_bytes(2, 3, 11, 20, 6, elem_bytes=4) == moved


# ----------------------------------------------------------------------------- compiling for Hopper

def compile_every_kernel(capability=90):
    """Compile each kernel (first autotune config) to machine code for a GPU of this compute capability
    (90: Hopper), no GPU needed. The interpreter runs Python, so it accepts code that the compiler
    rejects; this catches that. Run in a fresh process with TRITON_INTERPRET=0 (see the test below)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner
    assert not kernels.INTERPRET
    pointer_types = {"context_ptr": "*i64", "multipliers_ptr": "*i64", "head_primes_ptr": "*i64",
                     "head_offsets_ptr": "*i64", "head_orders_ptr": "*i32", "tile_expert_ptr": "*i32",
                     "tile_start_ptr": "*i32", "tile_end_ptr": "*i32", "offsets_ptr": "*i32",
                     "rows_ptr": "*i64", "grad_table_ptr": "*fp32", "part_out_ptr": "*fp32",
                     "part_lse_ptr": "*fp32"}  # others bf16

    def compile_for(kernel, **constexprs):
        jit, config = (kernel.fn, kernel.configs[0]) if isinstance(kernel, Autotuner) else (kernel, triton.Config({}))
        constexprs.update(config.kwargs)
        signature = {}
        for name in jit.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = pointer_types.get(name, "*bf16")
            else:
                signature[name] = "fp32" if name == "scale_log2e" else "i32"
        # as a launch with realistic shapes specialises: pointers and integers divisible by 16
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(jit.arg_names)
                 if signature[name] not in ("constexpr", "fp32")}
        triton.compile(ASTSource(jit, signature, constexprs=constexprs, attrs=attrs), target=GPUTarget("cuda", capability, 32),
                       options={"num_warps": config.num_warps, "num_stages": config.num_stages})

    compile_for(kernels._engram_lookup_kernel, MAX_ORDER=3, BLOCK_D=32)
    compile_for(kernels._engram_lookup_backward_kernel, MAX_ORDER=3, BLOCK_D=32, BLOCK_T=128)
    compile_for(kernels._engram_rows_kernel, MAX_ORDER=3, BLOCK_T=128)
    compile_for(kernels._grouped_swiglu_up_kernel, SAVE_PREACT=True, PRECISION="ieee", BLOCK_M=64)
    compile_for(kernels._grouped_gemm_kernel, TRANS_B=False, HAS_SECOND=True, PRECISION="ieee", BLOCK_M=64)
    compile_for(kernels._grouped_swiglu_backward_kernel, PRECISION="ieee", BLOCK_M=64)
    compile_for(kernels._grouped_weight_grad_kernel, PRECISION="ieee")
    compile_for(kernels._mla_decode_split_kernel, PRECISION="ieee", BLOCK_C=512, BLOCK_R=64)
    compile_for(kernels._mla_decode_combine_kernel, BLOCK_SPLITS=64, BLOCK_C=64)


def test_kernels_compile_for_sm90_and_sm75_without_a_gpu(tmp_path):
    """Hopper, and a T4 (sm75): there Triton lowers tl.dot to FMA, which compiles but is why --kernels=auto
    keeps GPUs below sm80 on the references (kernels.unsupported)."""
    pytest.importorskip("triton", reason="triton is not installed")
    if DEVICE == "cuda":
        pytest.skip("on a GPU the other tests compile the kernels for real")
    pytest.importorskip("triton.compiler", reason="this triton has no ahead-of-time compiler API")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}  # fresh, compiled kernels
    code = "import test_kernels; test_kernels.compile_every_kernel(90); test_kernels.compile_every_kernel(75)"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env,
                          capture_output=True, text=True, timeout=300)
    skip_if_exercise(done.stderr)
    assert done.returncode == 0, done.stderr[-4000:]


# ----------------------------------------------------------------------------- bf16 (GPU only)

@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels are checked on a GPU only")
def test_bf16_kernels_close_to_float32_reference(triton_kernels):
    context, args, table = engram_case(seed=5, T=300)
    out = kernels.engram_lookup(context, *args, table.bfloat16())
    assert torch.equal(out, engram_lookup_reference(context, *args, table).bfloat16())

    x, counts, w1, w3, w2 = moe_case([0, 70, 130, 1], dim=96, inter=160)
    y = kernels.moe_grouped_swiglu(*(t.bfloat16() if t.is_floating_point() else t for t in (x, counts, w1, w3, w2)))
    torch.testing.assert_close(y.float(), grouped_swiglu(x, counts, w1, w3, w2), rtol=3e-2, atol=3e-2)

    q, q_rope, kv, k_rope = mla_case(seed=6, B=4, H=16, C=512, R=64, S=1000)
    out = kernels.mla_decode_attention(q.bfloat16(), q_rope.bfloat16(), kv.bfloat16(), k_rope.bfloat16(), 0.05)
    torch.testing.assert_close(out.float(), mla_decode_reference(q, q_rope, kv, k_rope, 0.05),
                               rtol=3e-2, atol=3e-2)
