"""Sample stories from a trained nano-engram model, streaming them to the terminal.

    python sample.py --out_dir=out --start="Once upon a time" --num_samples=3 \
        --max_new_tokens=200 --temperature=0.8 --top_k=200
    python sample.py --start=FILE:prompt.txt

Generation uses the model's KV cache (MLA's latent cache, Engram's n-gram tail and
conv state), so each new token costs one single-token forward pass. Past block_size
tokens the model sees a sliding window of the last block_size (GPT.generate).
"""
import os
import sys
from dataclasses import dataclass

import torch

import cli
import harness
import kernels
import memory
import plots


@dataclass
class SampleConfig:
    out_dir: str = "out"              # the run folder holding ckpt.pt
    start: str = "Once upon a time"   # prompt text, or FILE:path to read it from a file
    num_samples: int = 3              # stories to sample
    max_new_tokens: int = 200         # tokens generated per story (unless it ends first)
    temperature: float = 0.8          # 0 = greedy
    top_k: int = 200                  # sample from the k likeliest tokens; 0 = from all of them
    seed: int = 1337                  # seeds the sampling
    device: str = "auto"              # 'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps'
    kernels: str = "auto"             # 'auto' | 'triton' | 'torch' (see kernels.py)
    stop_at_eot: bool = True          # end a sample at the end-of-story token
    show_gates: bool = False          # after sampling, show where Engram's gate opens (PNG + terminal)
    gates_png: str = ""               # where the heatmap goes; '' = out_dir/gates.png
    engram_offload: str = ""          # Engram's tables: '' on the device, 'host' in host memory, 'disk' memory-mapped from out_dir/engram_tables.bin (written once)

    def __post_init__(self):
        cli.check_numbers(self, seeds=("seed",), at_least_1=("max_new_tokens",),
                          nonneg=("num_samples", "temperature", "top_k"),
                          one_of={"kernels": kernels.MODES, "engram_offload": memory.OFFLOAD_MODES})


def read_prompt(start):
    """--start's text, or the UTF-8 text of the file after FILE:."""
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise cli.ConfigError(f"--start=FILE:{path}: cannot read the prompt file ({e.strerror})") from None
    except UnicodeDecodeError:
        raise cli.ConfigError(f"--start=FILE:{path}: not a UTF-8 text file; give the prompt as plain text") from None


def stream_sample(model, tok, prompt_ids, cfg, out=sys.stdout):
    """Generate one sample, printing text as soon as its bytes form whole characters."""
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=next(model.parameters()).device)
    generated, shown = [], ""
    for nxt in model.generate(idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None):
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


def show_gates(model, tok, ids, png_path, out=sys.stdout):
    """Where Engram's gate (paper §2.3: alpha_t in (0, 1), how much memory is let in) opens over ids:
    in the terminal each token followed by its gate value in tenths (⁹ = 0.9 or more), per gated Engram
    block, and a heatmap with a row per block. With n residual streams (mhc.py) every stream has its own
    gate: the terminal shows their mean, the heatmap a row per stream."""
    ids = ids[:model.cfg.block_size]
    with torch.no_grad():
        model(torch.tensor([ids], device=next(model.parameters()).device))
    pieces, rows = [tok.decode([i]) for i in ids], {}
    for layer, block in enumerate(model.blocks):
        if block.engram is None or not block.engram.use_gate:
            continue
        g = block.engram.last_gate[0].float().cpu()  # (T, n)
        n = g.shape[1]
        label = f"block {layer}" if n == 1 else f"block {layer}, mean of {n} streams"
        out.write(f"--- Engram gate, {label} (mean {g.mean():.2f})\n")
        out.write("".join(p + str(min(9, int(v * 10))).translate(SUPERSCRIPT) for p, v in zip(pieces, g.mean(1).tolist())))
        out.write("\n")
        rows.update({f"block {layer}" if n == 1 else f"block {layer} stream {m}": g[:, m] for m in range(n)})
    if diversity := model.hc_stream_diversity():  # mHC: how far the streams are from their mean, per block
        out.write("stream diversity (mean |x_m - mean| / |mean|) by block: "
                  + ", ".join(f"{k}: {v:.4f}" for k, v in diversity.items()) + "\n")
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    harness.save_figure(plots.gates(rows, pieces), png_path, bbox_inches="tight")
    out.write(f"gate heatmap written to {png_path}\n")


def main(argv=None):
    try:
        cfg = cli.parse(SampleConfig(), sys.argv[1:] if argv is None else argv, __doc__)
        device, _ = cli.setup_device(cfg.device, cfg.kernels)  # sampling runs in float32
        gates_png = cfg.gates_png or os.path.join(cfg.out_dir, "gates.png")
        if cfg.show_gates:  # a place the heatmap cannot go fails now, not after sampling
            harness.check_writable_dir(os.path.dirname(os.path.abspath(gates_png)), "gates_png")
        model, tok = harness.load_run(cfg.out_dir, device, cfg.engram_offload)
        if cfg.show_gates and not any(b.engram is not None and b.engram.use_gate for b in model.blocks):
            raise cli.ConfigError("--show_gates: this model has no gated Engram layer (it was trained with "
                                  "--engram=off or --engram_gate=false)")
        prompt = read_prompt(cfg.start)
        prompt_ids = tok.encode(prompt) or [tok.eot_id]  # an empty prompt starts a fresh story
    except cli.ConfigError as e:
        cli.fail(e)
    except KeyboardInterrupt:
        cli.fail("interrupted", 130)
    try:
        generate(cfg, model, tok, prompt, prompt_ids, gates_png)
    except KeyboardInterrupt:  # Ctrl-C while a story streams: end its line, then one line on stderr
        print(flush=True)
        cli.fail("interrupted", 130)
    except cli.ConfigError as e:  # --show_gates: the heatmap could not be written
        cli.fail(e)


def generate(cfg, model, tok, prompt, prompt_ids, gates_png):
    """The samples, streamed to stdout, then the gates of the first one (--show_gates)."""
    if unknown := prompt_ids.count(tok.unk_id):  # unk_id is None in the full gpt2 vocabulary: never counted
        print(f"warning: {unknown} of the prompt's {len(prompt_ids)} tokens are not in the model's vocabulary "
              "and became <unk>", file=sys.stderr)
    torch.manual_seed(cfg.seed)
    ids = prompt_ids
    for i in range(cfg.num_samples):
        print(f"--- sample {i + 1}/{cfg.num_samples}")
        sys.stdout.write(prompt)
        generated = stream_sample(model, tok, prompt_ids, cfg)
        if i == 0:
            ids = prompt_ids + generated
    if cfg.show_gates:  # on the first sample, or on the prompt alone with --num_samples=0
        show_gates(model, tok, ids, gates_png)


if __name__ == "__main__":
    main()
