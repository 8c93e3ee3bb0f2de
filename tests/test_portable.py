"""The hardware users have: precision and kernels chosen per GPU (faked here where this machine lacks
it: V100 sm70, T4 sm75, A100 sm80, H100 sm90, an Apple GPU), Engram's dense fallback on MPS, real fp16
autocast with loss scaling on the CPU (sparse tables, clipping, both optimizers, exact resume, a skipped
overflow step), and checkpoints that move between machines."""
import json

import pytest
import torch

import cli
import harness
import kernels
import train
from scripts import run
from test_train import TINY, data_flags, read_log, whole_and_resumed


GPUS = {"sm70": ("Tesla V100-SXM2-16GB", (7, 0)), "sm75": ("Tesla T4", (7, 5)),
        "sm80": ("NVIDIA A100-SXM4-40GB", (8, 0)), "sm90": ("NVIDIA H100 80GB HBM3", (9, 0))}


def hardware(kind):
    if kind in GPUS:
        name, capability = GPUS[kind]
        return {"type": "cuda", "name": name, "capability": capability}
    return {"type": kind, "name": kind.upper(), "capability": None}


@pytest.fixture
def fake_gpu(monkeypatch):
    """Make this machine look as if it had one CUDA GPU of the given kind (no CUDA call reaches the driver)."""
    monkeypatch.setattr(kernels, "mode", kernels.mode)  # whatever set_mode does is undone after the test

    def install(kind):
        name, capability = GPUS[kind]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(kernels, "_capability", lambda device: capability)
        monkeypatch.setattr(kernels, "HAVE_TRITON", True)
        monkeypatch.setattr(kernels, "INTERPRET", False)
    return install


# ----------------------------------------------------------------------------- precision by hardware

@pytest.mark.parametrize("kind,expected", [("sm70", "float16"), ("sm75", "float16"), ("sm80", "bfloat16"),
                                           ("sm90", "bfloat16"), ("mps", "float32"), ("cpu", "float32")])
def test_dtype_auto_follows_the_hardware(kind, expected):
    assert cli.resolve_dtype("auto", hardware(kind)) == expected


@pytest.mark.parametrize("kind", ["sm70", "sm75"])
def test_dtype_bfloat16_on_a_gpu_without_it_names_float16(kind):
    with pytest.raises(cli.ConfigError, match=r"--dtype=float16") as error:
        cli.resolve_dtype("bfloat16", hardware(kind))
    assert GPUS[kind][0] in str(error.value) and "compute capability" in str(error.value)


def test_dtype_explicit_choices_pass_where_the_hardware_has_them():
    for kind in ("sm80", "sm90", "cpu", "mps"):
        assert cli.resolve_dtype("bfloat16", hardware(kind)) == "bfloat16"
    for kind in GPUS.keys() | {"cpu", "mps"}:
        assert cli.resolve_dtype("float16", hardware(kind)) == "float16"
        assert cli.resolve_dtype("float32", hardware(kind)) == "float32"


def test_dtype_bfloat16_on_a_faked_t4_is_a_one_line_error_through_train_py(fake_gpu):
    fake_gpu("sm75")
    with pytest.raises(cli.ConfigError, match="Tesla T4 .compute capability 7.5. has no bfloat16; use --dtype=float16"):
        train.config(["--device=cuda", "--dtype=bfloat16"])
    cfg = train.config(["--device=cuda"])  # auto: the gpu preset, and fp16 for it
    assert cfg.preset == "gpu" and cli.resolve_dtype(cfg.dtype, cli.describe_device(cfg.device)) == "float16"


# ----------------------------------------------------------------------------- kernels by hardware

@pytest.mark.parametrize("kind", list(GPUS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dtype_and_capability_pick_each_kernel(fake_gpu, kind, dtype):
    """auto: every kernel on sm80+ for bf16, fp16 and fp32; none on V100 or T4 (Triton's tl.dot has no
    tensor cores below sm80), whatever the dtype."""
    fake_gpu(kind)
    kernels.set_mode("auto", "cuda", dtype)
    on_sm80 = GPUS[kind][1] >= (8, 0)
    for op in kernels.OPS:
        assert kernels.use_triton("cuda", op, dtype) is on_sm80
        assert (kernels.unsupported(op, GPUS[kind][1], dtype) == "") is on_sm80
    plan = kernels.plan("cuda", dtype)
    assert set(plan) == set(kernels.OPS)
    if on_sm80:
        assert set(plan.values()) == {"triton"}
    else:
        assert all(v.startswith("torch (compute capability") for v in plan.values())
    assert not kernels.use_triton("cpu", "engram_lookup")  # CPU tensors stay on the references


def test_dtype_without_tensor_core_dot_keeps_the_dot_kernels_on_the_reference():
    """The lookup only gathers rows (any dtype); the GEMM kernels take bf16, fp16 and fp32 operands only."""
    assert kernels.unsupported("engram_lookup", (9, 0), torch.float64) == ""
    for op in ("moe_grouped_swiglu", "mla_decode_attention"):
        assert "float64" in kernels.unsupported(op, (9, 0), torch.float64)


@pytest.mark.parametrize("kind", ["sm70", "sm75"])
def test_dtype_kernels_triton_on_an_old_gpu_is_a_one_line_error(fake_gpu, kind):
    fake_gpu(kind)
    with pytest.raises(cli.ConfigError) as error:
        train.config(["--device=cuda", "--kernels=triton"])
    name, (major, minor) = GPUS[kind]
    assert name in str(error.value) and f"compute capability {major}.{minor}" in str(error.value)
    assert "--kernels=auto" in str(error.value)
    fake_gpu("sm90")
    assert train.config(["--device=cuda", "--kernels=triton"]).kernels == "triton"  # an H100 takes it


def test_dtype_and_kernels_are_announced(prepared, tmp_path, capsys):
    train.main(TINY + data_flags(prepared) + [f"--out_dir={tmp_path / 'o'}", "--max_iters=1", "--eval_interval=1"])
    out = capsys.readouterr().out
    assert "precision: float32 (--dtype=auto on CPU)" in out
    assert "kernels: all torch (no CUDA GPU: cpu)" in out


# ----------------------------------------------------------------------------- Apple GPUs

@pytest.fixture
def fake_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)


def test_mps_is_chosen_after_cuda_and_gets_the_cpu_preset(fake_mps):
    assert cli.resolve_device("auto") == "mps"
    cfg = train.config(["--engram_rows_per_head=65536"])  # a fixed table: no data to size it by
    assert cfg.device == "mps" and cfg.preset == "cpu" and not cfg.compile
    assert cli.resolve_dtype(cfg.dtype, cli.describe_device(cfg.device)) == "float32"


def test_mps_trains_the_tables_densely_and_says_what_it_costs(fake_mps):
    rows = "--engram_rows_per_head=65536"  # the preset's table on a large split; no data to size it by
    cfg = train.config(["--device=mps", rows])
    assert cfg.model.engram.engram_sparse is False and cfg.model.engram.engram_layers == (1,)
    note = harness.dense_table_note(cfg, train.GPT(cfg.model).param_counts()["engram_tables"])
    assert note.startswith("note: MPS has no sparse tensors") and "8.4M parameters" in note and "MB gradient" in note
    optimizers = train.GPT(cfg.model).configure_optimizers(1e-3, 0.1, (0.9, 0.95), "mps")
    assert [type(o).__name__ for o in optimizers] == ["AdamW"]  # no SparseAdam: no sparse gradient anywhere
    # nothing changes where sparse tensors exist, and a model without tables needs no note
    assert train.config(["--device=cpu", rows]).model.engram.engram_sparse is True
    assert harness.dense_table_note(train.config(["--device=mps", "--engram=off"]), 0) == ""


def test_mps_resume_of_a_sparse_run_is_a_one_line_error(prepared, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train.main(TINY + data_flags(prepared) + [f"--out_dir={out}", "--max_iters=2", "--eval_interval=2"])
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with pytest.raises(cli.ConfigError, match="trains its Engram tables sparsely, which MPS cannot"):
        train.config([f"--out_dir={out}", "--resume", "--device=mps", "--max_iters=4"])


# ----------------------------------------------------------------------------- fp16 with loss scaling, on the CPU

FP16 = TINY + ["--dtype=float16", "--eval_interval=10"]


def test_fp16_autocast_trains_with_the_grad_scaler_and_sparse_tables(prepared, tmp_path):
    out = tmp_path / "fp16"
    train.main(FP16 + data_flags(prepared) + [f"--out_dir={out}", "--max_iters=30"])
    log = read_log(out)
    assert log[-1]["val_loss"] < log[0]["val_loss"] - 0.5
    assert all("loss_scale" in r and "skipped_steps" in r for r in log[1:])
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["scaler"]["scale"] == log[-1]["loss_scale"] > 0
    adamw, sparse_adam = ckpt["optimizers"]  # the table's own optimizer: lazy Adam, lr x 5
    assert [g["lr_mult"] for g in sparse_adam["param_groups"]] == [5.0]
    skipped = sum(r["skipped_steps"] for r in log[1:])
    for state in ckpt["optimizers"]:  # each optimizer stepped on every step that was not skipped
        assert {float(s["step"]) for s in state["state"].values()} == {30.0 - skipped}


def test_fp16_resume_is_exact_with_the_scalers_state(prepared, tmp_path):
    common = FP16 + data_flags(prepared) + ["--lr_decay_iters=20", "--eval_interval=5"]
    a, b = whole_and_resumed(common, tmp_path, 20, 10)
    assert [(r["iter"], r["val_loss"], r["train_loss_mean"], r.get("loss_scale")) for r in a] == \
           [(r["iter"], r["val_loss"], r["train_loss_mean"], r.get("loss_scale")) for r in b]


@pytest.mark.parametrize("where", ["dense", "table"])
def test_fp16_overflow_step_is_skipped_by_both_optimizers(prepared, tmp_path, monkeypatch, where):
    """An inf planted in the 3rd backward's gradient of one parameter, a dense one (AdamW's) or the sparse
    table (SparseAdam's): neither optimizer steps, the loss scale halves, the run goes on, weights stay finite."""
    class OneOverflow(train.GPT):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            tables = [m.table.weight for m in self.modules() if hasattr(m, "table")]
            backwards = []

            def plant(grad):  # runs before the gradient reaches .grad, so the scaler sees it as a real overflow
                backwards.append(1)
                if len(backwards) == 3:
                    grad = grad.clone()
                    (grad._values() if grad.is_sparse else grad).view(-1)[0] = float("inf")
                return grad
            (self.tok_emb.weight if where == "dense" else tables[0]).register_hook(plant)
    monkeypatch.setattr(train, "GPT", OneOverflow)
    out = tmp_path / "overflow"
    train.main(FP16 + data_flags(prepared) + [f"--out_dir={out}", "--max_iters=10", "--eval_interval=10"])
    log, ckpt = read_log(out), torch.load(out / "ckpt.pt", weights_only=False)
    assert log[-1]["skipped_steps"] == 1 and log[-1]["loss_scale"] == 2.0 ** 15  # GradScaler starts at 2^16
    steps = [{float(s["step"]) for s in state["state"].values()} for state in ckpt["optimizers"]]
    assert steps[0] == steps[1] == {9.0}  # AdamW and SparseAdam both skipped the one step
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_fp16_a_real_divergence_still_stops_the_run(prepared, tmp_path):
    proc = run("train.py", *FP16, *data_flags(prepared), f"--out_dir={tmp_path / 'nan'}", "--max_iters=60",
               "--eval_interval=1", "--learning_rate=1e30", "--warmup_iters=0", "--grad_clip=0")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "non-finite" in proc.stderr or "overflowed" in proc.stderr


# ----------------------------------------------------------------------------- checkpoints between machines

def test_portable_checkpoint_with_compile_and_ddp_prefixes_loads(prepared, tmp_path):
    out = tmp_path / "run"
    train.main(TINY + data_flags(prepared) + [f"--out_dir={out}", "--max_iters=3", "--eval_interval=3"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    # as torch.compile (_orig_mod.) and DDP (module.) name the parameters of the models they wrap
    ckpt["model"] = {("module._orig_mod." if i % 2 else "_orig_mod.") + k: v for i, (k, v) in enumerate(ckpt["model"].items())}
    torch.save(ckpt, out / "ckpt.pt")
    proc = run("sample.py", f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=5", "--device=cpu")
    assert proc.returncode == 0, proc.stderr
    train.main([f"--out_dir={out}", "--resume", "--max_iters=5"])
    assert read_log(out)[-1]["iter"] == 5


def test_portable_gpu_checkpoint_resumes_on_a_cpu(prepared, tmp_path):
    """A run saved on a GPU with Triton kernels (device cuda, kernels triton, bf16) resumes here: the
    settings this machine lacks fall back to auto, each with a note, and the run continues."""
    out = tmp_path / "gpu-run"
    train.main(TINY + data_flags(prepared) + [f"--out_dir={out}", "--max_iters=3", "--eval_interval=3"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    ckpt["config"].update(device="cuda", kernels="triton", dtype="bfloat16")
    torch.save(ckpt, out / "ckpt.pt")
    env = {"TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}  # no interpreter: triton cannot run on this CPU
    proc = run("train.py", f"--out_dir={out}", "--resume", "--max_iters=5", env_extra=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming with --device=auto" in proc.stdout and "resuming with --kernels=auto" in proc.stdout
    assert "precision: bfloat16 autocast" in proc.stdout  # the CPU has bf16: kept
    assert read_log(out)[-1]["iter"] == 5
    assert json.loads((out / "config.json").read_text())["device"] == "cpu"
