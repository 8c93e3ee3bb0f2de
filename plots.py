"""Every figure the scripts draw. Each function takes numbers (a run's log records, compare.py's results,
analyze.py's analyses) and returns a matplotlib Figure; the caller writes it with harness.save_figure, which
replaces the file atomically and closes the figure. Nothing here reads or writes a file.
"""
import matplotlib
matplotlib.use("Agg")  # figures go to files; no display needed
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
import torch  # noqa: E402


def close(fig):
    plt.close(fig)


# ----------------------------------------------------------------------------- train.py and sample.py

def losses(records: list):
    """Train and validation loss against training tokens, from log.jsonl's records (loss.png)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    trained = [r for r in records if r.get("train_loss_mean") is not None]
    ax.plot([r["tokens"] for r in trained], [r["train_loss_mean"] for r in trained], ".-",
            label="train (mean over the steps since the previous evaluation)")
    ax.plot([r["tokens"] for r in records], [r["val_loss"] for r in records], "o-", label="validation")
    if len(records) > 2:  # the untrained model's loss (~ln vocab) would flatten the rest of the curve
        ax.set_ylim(top=max(r["val_loss"] for r in records[1:]) + 0.5)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def gates(gates: dict, pieces: list):
    """sample.py --show_gates (gates.png): Engram's gate over the tokens as a heatmap, one row per Engram block or
    stream ({row label: (T,) gate values}), each cell labelled with its token, in strips of 32 tokens."""
    matrix = torch.stack(list(gates.values())).numpy()  # (n_layers, T)
    per_row = 32  # tokens per strip, so long stories stay legible
    n_rows = (len(pieces) + per_row - 1) // per_row
    fig, axes = plt.subplots(n_rows, 1, figsize=(16, n_rows * (1.2 * len(gates) + 0.25)), squeeze=False)
    for r, ax in enumerate(axes[:, 0]):
        strip = np.full((len(gates), per_row), np.nan)  # the last strip is padded, so cells keep one width
        values = matrix[:, r * per_row:(r + 1) * per_row]
        strip[:, :values.shape[1]] = values
        im = ax.imshow(strip, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        for j, piece in enumerate(pieces[r * per_row:(r + 1) * per_row]):
            for row in range(len(gates)):  # the token itself, written in its cell
                ax.text(j, row, piece.strip() or repr(piece), rotation=90, ha="center", va="center", fontsize=8,
                        color="black" if values[row, j] > 0.5 else "white")
        ax.set_xticks([])
        ax.set_yticks(range(len(gates)))
        ax.set_yticklabels(list(gates), fontsize=8)
    axes[0, 0].set_title("Engram gate alpha_t per token (bright = memory let in, dark = gated out)")
    fig.colorbar(im, ax=axes[:, 0].tolist(), fraction=0.02)
    return fig


# ----------------------------------------------------------------------------- compare.py

def curves(results):
    """compare.py (compare.png): validation loss against tokens and against seconds: the mean over seeds, a band from min to max."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    lows, tops = [], []
    for name, a in results["arms"].items():
        curves = [s["curve"] for s in a["seeds"].values()]
        if not curves:
            continue
        # iter 0 (the untrained loss, ~ln vocab) is left out: it would flatten every difference that matters
        n = min(len(c["iter"]) for c in curves)  # same schedule, so the same eval iters (unless one was extended)
        loss = np.array([c["val_loss"][1:n] for c in curves])  # (seeds, evals)
        tokens = np.array(curves[0]["tokens"][1:n])
        seconds = np.mean([c["elapsed_s"][1:n] for c in curves], axis=0)  # each seed's timing differs a little
        for ax, x in zip(axes, (tokens, seconds)):
            line, = ax.plot(x, loss.mean(0), label=name)
            ax.fill_between(x, loss.min(0), loss.max(0), color=line.get_color(), alpha=0.2)
        lows.append(loss.min())
        tops.append(loss.mean(0)[len(tokens) // 4])  # the first quarter of training is far above the rest
    if lows and max(tops) > min(lows):
        pad = 0.03 * (max(tops) - min(lows))
        axes[0].set_ylim(min(lows) - pad, max(tops) + pad)
    axes[0].set_xlabel("training tokens")
    axes[1].set_xlabel("wall-clock seconds")
    axes[0].set_ylabel("validation loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        if lows:
            ax.legend()
    fig.suptitle("Engram vs MoE on TinyStories: validation loss (line = mean over seeds, band = min..max)")
    fig.tight_layout()
    return fig


def allocation(results):
    """compare.py --allocation_sweep (allocation.png): final validation loss against the share of the sparse budget given to Engram (the paper's U-curve)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    points = [p for p in results["sweep"] if "final_val_loss" in p]
    for p in points:
        ax.scatter([p["table_share"]] * len(p["seeds"]), [s["final_val_loss"] for s in p["seeds"].values()],
                   color="gray", s=12, alpha=0.6)
    ax.errorbar([p["table_share"] for p in points], [p["final_val_loss"]["mean"] for p in points],
                yerr=[p["final_val_loss"]["std"] for p in points], marker="o", capsize=4,
                label="mean ± std over seeds")
    ax.set_xlabel("share of the sparse parameter budget held by Engram tables")
    ax.set_ylabel("final validation loss")
    ax.set_title("Allocation sweep at fixed total and active parameters")
    ax.grid(alpha=0.3)
    if points:
        ax.legend()
    fig.tight_layout()
    return fig


def memory_scaling(results, variants):
    """compare.py --memory_sweep (memory_scaling.png): validation loss (left) and step time (right) against table parameters on a log axis, one line
    per memory variant; moe (no memory) as a horizontal line; the n-gram bound as vertical lines."""
    memory, moe = results["memory"], results["arms"].get("moe")
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(13, 4.8))
    for variant in variants:
        rows = [r for r in memory["rows"] if r["variant"] == variant and "final_val_loss" in r]
        if not rows:
            continue
        x = [r["table_params"] for r in rows]
        line = ax.errorbar(x, [r["final_val_loss"]["mean"] for r in rows], marker="o", capsize=3, label=variant,
                           yerr=[r["final_val_loss"]["std"] for r in rows])[0]
        for r in rows:  # every seed, so that the spread is visible
            ax.scatter([r["table_params"]] * len(r["seeds"]), [s["final_val_loss"] for s in r["seeds"].values()],
                       color=line.get_color(), s=10, alpha=0.5)
        if variant in memory["fits"]:
            fit = memory["fits"][variant]
            xs = np.array([r["table_params"] for r in rows if r["log2_rows"] in fit["log2_rows"]])
            ax.plot(xs, fit["intercept"] + fit["slope_per_doubling"] * np.log2(xs), "--", color=line.get_color(),
                    label=f"{variant} fit: {fit['slope_per_doubling']:+.3f} per doubling")
        ax_t.plot(x, [r["step_ms"] for r in rows], marker="o", color=line.get_color(), label=variant)
    params_per_row = memory["rows"][0]["table_params"] / memory["rows"][0]["rows_per_head"]  # gated: all heads
    for n, style in ((2, ":"), (3, "-.")):
        ax.axvline(memory["distinct_ngrams"][n] * params_per_row, color="gray", linestyle=style,
                   label=f"rows per head = distinct {n}-grams in train ({memory['distinct_ngrams'][n]:,})")
    if moe and "final_val_loss" in moe:
        ax.axhline(moe["final_val_loss"]["mean"], color="black", linewidth=1, label="moe, no memory")
        ax_t.axhline(1000 * memory["tokens_per_step"] / moe["tok_per_s"], color="black", linewidth=1,
                     label="moe, no memory")
    for a, ylabel in ((ax, "final validation loss"), (ax_t, "step time (ms)")):
        a.set_xscale("log")
        a.set_xlabel("Engram table parameters")
        a.set_ylabel(ylabel)
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    ax_t.set_ylim(bottom=0)
    fig.suptitle("Memory scaling: only the Engram table grows (backbone, steps and batch fixed)")
    fig.tight_layout()
    return fig
