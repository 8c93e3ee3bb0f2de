"""Sample stories from a trained nano-engram model, streaming them to the terminal.

    python sample.py --out_dir=out --start="Once upon a time" --num_samples=3 \
        --max_new_tokens=200 --temperature=0.8 --top_k=200
    python sample.py --start=FILE:prompt.txt

Generation uses the model's KV cache (MLA's latent cache, Engram's n-gram
tail and conv state), so each new token costs one single-token forward pass.
"""
import os
import sys
from dataclasses import dataclass

import torch

import kernels
from data import Tokenizer
from model import GPT, GPTConfig
from train import ConfigError, apply_flags, load_checkpoint, parse_flags


@dataclass
class SampleConfig:
    out_dir: str = "out"
    start: str = "Once upon a time"   # prompt text, or FILE:path to read it from a file
    num_samples: int = 3
    max_new_tokens: int = 200
    temperature: float = 0.8          # 0 = greedy
    top_k: int = 200                  # 0 = no top-k filtering
    seed: int = 1337
    device: str = "auto"
    kernels: str = "auto"             # 'auto' | 'triton' | 'torch' (see kernels.py)
    stop_at_eot: bool = True          # end a sample at the end-of-story token
    show_gates: bool = False          # after sampling, show where Engram's gate opens (PNG + terminal)
    gates_png: str = ""               # where the heatmap goes; '' = out_dir/gates.png


def load_model(out_dir, device, kernel_mode="auto"):
    """The trained GPT and its tokenizer from out_dir/ckpt.pt."""
    path = os.path.join(out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path, device="cpu")
    try:
        model_cfg = GPTConfig.from_dict(ckpt["config"]["model"])
        model_cfg.kernels = kernel_mode  # how to compute is the sampler's choice, not the checkpoint's
        model = GPT(model_cfg)
        model.load_state_dict(ckpt["model"])
        tok = Tokenizer.from_meta(ckpt["meta"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # written by another version of the code?
        raise ConfigError(f"checkpoint {path} does not fit this code ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:120]}); retrain it") from None
    return model.to(device).eval(), tok


def read_prompt(start):
    if start.startswith("FILE:"):
        path = start[len("FILE:"):]
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise ConfigError(f"--start=FILE:{path}: cannot read prompt file ({e.strerror})") from None
    return start


def stream_sample(model, tok, prompt_ids, cfg, out=sys.stdout):
    """Generate one sample, printing text as soon as its bytes form whole characters."""
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=next(model.parameters()).device)
    budget = min(cfg.max_new_tokens, model.cfg.block_size - idx.size(1))
    generated, shown = [], ""
    for nxt in model.generate(idx, budget, temperature=cfg.temperature, top_k=cfg.top_k or None):
        token = nxt.item()
        if cfg.stop_at_eot and token == tok.eot_id:
            break
        generated.append(token)
        text = tok.decode(generated)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[len(shown):])
            out.flush()
            shown = text
    out.write(tok.decode(generated)[len(shown):] + "\n")
    return generated


SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def engram_gates(model, ids):
    """Run ids (list of int) through the model; return {block index: gate values (T,)} for
    every gated Engram layer (Engram paper §2.3: alpha_t in (0, 1), how much memory is let in)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        model(torch.tensor([ids[:model.cfg.block_size]], device=device))
    return {i: b.engram.last_gate[0].float().cpu() for i, b in enumerate(model.blocks)
            if b.engram is not None and b.engram.last_gate is not None}


def show_gates(model, tok, ids, png_path, out=sys.stdout):
    """A heatmap of the gate over the tokens (one row per Engram layer) and a terminal
    rendering: each token followed by its gate value in tenths (⁹ = 0.9 or more)."""
    gates = engram_gates(model, ids)
    if not gates:
        raise ConfigError("this model has no gated Engram layer (trained with --engram=off or --engram_gate=false)")
    pieces = [tok.decode([i]) for i in ids[:model.cfg.block_size]]
    for layer, g in gates.items():
        out.write(f"--- Engram gate, block {layer} (mean {g.mean():.2f})\n")
        out.write("".join(p + str(min(9, int(v * 10))).translate(SUPERSCRIPT) for p, v in zip(pieces, g.tolist())))
        out.write("\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
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
        ax.set_yticklabels([f"block {i}" for i in gates], fontsize=8)
    axes[0, 0].set_title("Engram gate alpha_t per token (bright = memory let in, dark = gated out)")
    fig.colorbar(im, ax=axes[:, 0].tolist(), fraction=0.02)
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    out.write(f"gate heatmap written to {png_path}\n")


def main(argv=None):
    try:
        cfg = apply_flags(SampleConfig(), parse_flags(sys.argv[1:] if argv is None else argv))
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            kernels.use_triton(cfg.kernels, device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        model, tok = load_model(cfg.out_dir, device, cfg.kernels)
        prompt = read_prompt(cfg.start)
        prompt_ids = tok.encode(prompt) or [tok.eot_id]  # an empty prompt starts a fresh story
        if len(prompt_ids) >= model.cfg.block_size:
            raise ConfigError(f"prompt is {len(prompt_ids)} tokens; the model's block_size is {model.cfg.block_size}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    torch.manual_seed(cfg.seed)
    ids = prompt_ids
    for i in range(cfg.num_samples):
        print(f"--- sample {i + 1}/{cfg.num_samples}")
        sys.stdout.write(prompt)
        generated = stream_sample(model, tok, prompt_ids, cfg)
        if i == 0:
            ids = prompt_ids + generated
    if cfg.show_gates:  # on the first sample, or on the prompt alone with --num_samples=0
        try:
            show_gates(model, tok, ids, cfg.gates_png or os.path.join(cfg.out_dir, "gates.png"))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    main()
