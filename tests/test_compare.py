"""compare.py end to end on a tiny configuration (2 arms, 1 seed, 4 steps), plus its parameter
solvers and the equal-wall-clock interpolation against hand-made numbers."""
import json
from pathlib import Path

import numpy as np
import pytest

import cli
import compare
import train
from model import GPT
from scripts import run


# The same tiny MLA + MoE + Engram model as test_train.py, at 4 steps.
TINY = ["--max_iters=4", "--eval_interval=2", "--eval_iters=1", "--batch_size=4", "--block_size=32",
        "--n_layer=2", "--n_embd=32", "--n_head=2", "--kv_lora_rank=16", "--qk_nope_head_dim=8",
        "--qk_rope_head_dim=8", "--v_head_dim=8", "--n_routed_experts=4", "--moe_inter_dim=16",
        "--engram_rows_per_head=101", "--engram_dim_per_order=16", "--device=cpu", "--preset=cpu"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_compare(*args):
    return run("compare.py", *args, env_extra={"OMP_NUM_THREADS": "1"})


def read_log(run_dir):
    with open(run_dir / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def test_end_to_end_writes_results_and_skips_finished_runs(prepared, tmp_path):
    out = tmp_path / "cmp"
    args = TINY + [f"--out_dir={out}", "--arms=moe,moe+engram", "--seeds=1",
                   f"--data_dir={prepared['data_dir']}", f"--source={prepared['source']}"]
    proc = run_compare(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[1/2] arm=moe seed=0" in proc.stdout and "[2/2] arm=moe+engram seed=0" in proc.stdout

    results = json.loads((out / "results.json").read_text())
    assert set(results["arms"]) == {"moe", "moe+engram"}
    for arm in ("moe", "moe+engram"):
        run_dir = out / arm / "seed0"
        for name in ("ckpt.pt", "log.jsonl", "config.json"):  # an ordinary train.py run dir
            assert (run_dir / name).exists()
        log = read_log(run_dir)
        assert [r["iter"] for r in log] == [0, 2, 4]
        assert json.loads((run_dir / "config.json").read_text())["seed"] == 1337  # same seed for every arm
        seed = results["arms"][arm]["seeds"]["1337"]
        assert seed["final_val_loss"] == log[-1]["val_loss"]
        assert seed["curve"]["val_loss"] == [r["val_loss"] for r in log]
        assert seed["wall_s"] == log[-1]["elapsed_s"]
    moe, eng = results["arms"]["moe"], results["arms"]["moe+engram"]
    assert moe["params"]["engram_tables"] == 0 < eng["params"]["engram_tables"]
    assert eng["params"]["total"] > moe["params"]["total"]
    steps = eng["vs_moe"]["equal_steps"]["mean"]
    assert steps == pytest.approx(eng["final_val_loss"]["mean"] - moe["final_val_loss"]["mean"])
    e, m = eng["seeds"]["1337"]["curve"], moe["seeds"]["1337"]["curve"]
    t = min(e["elapsed_s"][-1], m["elapsed_s"][-1])
    expected = np.interp(t, e["elapsed_s"], e["val_loss"]) - np.interp(t, m["elapsed_s"], m["val_loss"])
    assert eng["vs_moe"]["equal_time"]["mean"] == pytest.approx(expected)

    md = (out / "results.md").read_text()
    assert "| moe |" in md and "| moe+engram |" in md and "python compare.py" in md
    png = (out / "compare.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 10_000

    # Rerun: both runs are finished, so nothing trains and no checkpoint is touched.
    ckpts = {p: p.stat().st_mtime_ns for p in out.glob("*/seed0/ckpt.pt")}
    proc = run_compare(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished, skipped") == 2 and "model:" not in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in ckpts} == ckpts

    # A longer schedule: the finished run is now unfinished and resumes from its checkpoint.
    proc = run_compare(*[a for a in args if not a.startswith("--max_iters")], "--max_iters=6", "--arms=moe")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming at iter 4" in proc.stdout
    assert [r["iter"] for r in read_log(out / "moe" / "seed0")] == [0, 2, 4, 6]


def test_mhc_arms_are_paired_with_their_one_stream_arms(prepared, tmp_path):
    out = tmp_path / "cmp"
    proc = run_compare(*TINY, f"--out_dir={out}", "--arms=moe,moe+mhc", "--seeds=1",
                       f"--data_dir={prepared['data_dir']}", f"--source={prepared['source']}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    mhc, moe = results["arms"]["moe+mhc"], results["arms"]["moe"]
    assert json.loads((out / "moe+mhc" / "seed0" / "config.json").read_text())["model"]["mhc"]["hc_mult"] == 4
    assert mhc["params"]["total"] > moe["params"]["total"] and mhc["params"]["engram_tables"] == 0
    vs = mhc["vs_one_stream"]
    assert vs["arm"] == "moe"
    assert vs["equal_steps"]["mean"] == pytest.approx(mhc["final_val_loss"]["mean"] - moe["final_val_loss"]["mean"])
    gain = mhc["seeds"]["1337"]["hc_amax_gain"]
    assert gain == read_log(out / "moe+mhc" / "seed0")[-1]["hc_amax_gain"] and 0.99 < gain["max"] < 1.01
    assert moe["seeds"]["1337"]["hc_amax_gain"] is None
    assert "moe+mhc − moe (4 residual streams against 1" in (out / "results.md").read_text()


def test_quick_demo_defaults_and_given_flags_win():
    cfg, flags = compare.parse_args(["--quick", "--device=cpu"])
    assert (cfg.preset, compare.arm_list(cfg), cfg.seeds, cfg.out_dir) == ("cpu", ["moe", "moe+engram"], 2, "out-quick")
    assert flags["max_iters"] == "200"  # passed on to every run
    cfg, flags = compare.parse_args(["--quick", "--device=cpu", "--seeds=3", "--out_dir=elsewhere", "--max_iters=50"])
    assert (cfg.seeds, cfg.out_dir, flags["max_iters"]) == (3, "elsewhere", "50")
    assert compare.parse_args(["--device=cpu"])[0].out_dir != "out-quick"


def tiny_base(**extra):
    """Base flags as compare.main builds them, at dims where the vocabulary dominates like in real runs."""
    argv = TINY + ["--n_embd=64", "--n_routed_experts=8", "--moe_inter_dim=32"]
    flags = cli.parse_flags(argv, cli.flat_fields(train.TrainConfig()))
    return {**flags, **{k: str(v) for k, v in extra.items()}}


def counts_of(flags, vocab_size):
    """Parameter counts built straight from train.py's config, independently of compare's helpers."""
    cfg = train.config(compare.to_argv(flags))
    cfg.model.vocab_size = vocab_size
    return GPT(cfg.model).param_counts(), cfg


def test_iso_params_and_dense_match_moe_within_two_percent():
    vocab, base = 6000, tiny_base()
    cfg = compare.CompareConfig(iso_share=0.5)
    moe, _ = counts_of({**base, "engram": "off"}, vocab)
    iso_flags, _ = compare.arm_flags("iso-params", base, vocab, moe, cfg)
    iso, iso_cfg = counts_of(iso_flags, vocab)
    assert iso_cfg.model.moe.n_routed_experts == 5  # 8 experts, top-2: half the 6 inactive ones give way
    assert iso["engram_tables"] > 0
    for kind in ("total", "active"):
        assert abs(iso[kind] - moe[kind]) <= 0.02 * moe[kind], (kind, iso, moe)

    dense_flags, _ = compare.arm_flags("dense", base, vocab, moe, cfg)
    dense, dense_cfg = counts_of(dense_flags, vocab)
    assert dense_cfg.model.ffn == "dense" and dense["total"] == dense["active"]
    assert abs(dense["active"] - moe["active"]) <= 0.02 * moe["active"]


def test_plan_shares_folders_between_identical_configs(tmp_path):
    cfg = compare.CompareConfig(out_dir=str(tmp_path), arms="moe,iso-params", iso_share=0.5,
                                allocation_sweep=True, sweep_shares="0,0.5,0.9")
    arms, sweep, _, moe = compare.plan(cfg, tiny_base(), 6000)
    assert [p.extra["n_routed_experts"] for p in sweep] == [8, 5, 3]  # nearest achievable E' per share
    assert sweep[0].dir == arms[0].dir  # share 0 is the moe arm itself
    assert sweep[1].dir == arms[1].dir  # and share 0.5 is iso-params
    for p in sweep:
        assert abs(p.params["total"] - moe["total"]) <= 0.02 * moe["total"]


def test_equal_wall_clock_interpolation():
    baseline = {"elapsed_s": [0.0, 10.0, 20.0], "val_loss": [5.0, 3.0, 2.0]}
    slower = {"elapsed_s": [0.0, 8.0, 16.0, 30.0], "val_loss": [5.0, 3.5, 2.5, 1.1]}
    # t* = 20 s (the baseline's end); slower at 20 s: 2.5 + (4/14) * (1.1 - 2.5) = 2.1
    assert compare.equal_time_difference(slower, baseline) == pytest.approx(2.1 - 2.0)
    # Reversed roles: t* is still 20 s, now the end of the arm's own curve.
    assert compare.equal_time_difference(baseline, slower) == pytest.approx(2.0 - 2.1)
    faster = {"elapsed_s": [0.0, 5.0], "val_loss": [5.0, 2.5]}
    # t* = 5 s; baseline at 5 s: halfway from 5.0 to 3.0 = 4.0
    assert compare.equal_time_difference(faster, baseline) == pytest.approx(2.5 - 4.0)


def test_bad_flags_fail_at_once_in_one_line(capsys):
    for argv, fragment in ((["--n_layr=2"], "--n_layer"), (["--arms=moe,engram"], "unknown arm"),
                           (["--seeds=0"], "--seeds=0"), (["--resume"], "resumes unfinished runs")):
        with pytest.raises(SystemExit) as exit_info:
            compare.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err, err


def test_memory_sweep_writes_its_table_plot_and_fit(prepared, tmp_path):
    """Only the table size changes between the sweep's runs; the table, the plot, the n-gram bound
    and the fitted slope all come out, and the sizes that pair with additive memory get 2 seeds."""
    out = tmp_path / "mem"
    args = [a for a in TINY if not a.startswith("--engram_rows_per_head")] + [
        f"--out_dir={out}", "--memory_sweep", "--memory_log2_rows=4,6,8", "--memory_ungated=4,8",
        f"--data_dir={prepared['data_dir']}", f"--source={prepared['source']}"]
    proc = run_compare(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    memory = results["memory"]
    rows = {(r["variant"], r["log2_rows"]): r for r in memory["rows"]}
    assert set(rows) == {("engram", 4), ("engram", 6), ("engram", 8), ("additive-2gram", 4), ("additive-2gram", 8)}
    assert [len(rows[("engram", n)]["seeds"]) for n in (4, 6, 8)] == [2, 1, 2]
    assert len(results["arms"]["moe"]["seeds"]) == 2
    tables = [rows[("engram", n)]["table_params"] for n in (4, 6, 8)]
    assert tables[0] < tables[1] < tables[2]
    totals = [rows[("engram", n)]["params"]["total"] - rows[("engram", n)]["table_params"] for n in (4, 6, 8)]
    assert len(set(totals)) == 1  # everything but the table is the same model
    cfgs = [json.loads((Path(r["dir"]) / "seed0" / "config.json").read_text()) for r in memory["rows"]]
    assert {c["max_iters"] for c in cfgs} == {4} and {c["model"]["n_embd"] for c in cfgs} == {32}
    additive = json.loads((Path(rows[("additive-2gram", 4)]["dir"]) / "seed0" / "config.json").read_text())
    assert additive["model"]["engram"]["engram_gate"] is False and additive["model"]["engram"]["ngram_orders"] == [2]
    bound = memory["distinct_ngrams"]
    assert 0 < bound["2"] < bound["3"] < results["train_tokens"]
    fit = memory["fits"]["engram"]
    assert fit["log2_rows"] == [4, 6, 8]  # all below the 2-gram bound here
    losses = [rows[("engram", n)]["final_val_loss"]["mean"] for n in (4, 6, 8)]
    assert fit["slope_per_doubling"] == pytest.approx(np.polyfit(np.log2(tables), losses, 1)[0])
    md = (out / "results.md").read_text()
    assert "Memory sweep" in md and "| engram | 2^6 |" in md and "per doubling" in md
    png = (out / "memory_scaling.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 10_000
