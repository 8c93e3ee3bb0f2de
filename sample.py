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
    stop_at_eot: bool = True          # end a sample at the end-of-story token


def load_model(out_dir, device):
    """The trained GPT and its tokenizer from out_dir/ckpt.pt."""
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"), device="cpu")
    model = GPT(GPTConfig.from_dict(ckpt["config"]["model"]))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return model, Tokenizer.from_meta(ckpt["meta"])


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


def main(argv=None):
    try:
        cfg = apply_flags(SampleConfig(), parse_flags(sys.argv[1:] if argv is None else argv))
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        model, tok = load_model(cfg.out_dir, device)
        prompt = read_prompt(cfg.start)
        prompt_ids = tok.encode(prompt) or [tok.eot_id]  # an empty prompt starts a fresh story
        if len(prompt_ids) >= model.cfg.block_size:
            raise ConfigError(f"prompt is {len(prompt_ids)} tokens; the model's block_size is {model.cfg.block_size}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    torch.manual_seed(cfg.seed)
    for i in range(cfg.num_samples):
        print(f"--- sample {i + 1}/{cfg.num_samples}")
        sys.stdout.write(prompt)
        stream_sample(model, tok, prompt_ids, cfg)


if __name__ == "__main__":
    main()
