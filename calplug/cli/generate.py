"""``calplug generate``: a model's plain greedy answer and its contrastive one
(`calplug.contrastive_generate`), side by side.

    calplug generate --model DIR --image a.png --prompt "USER: <image>\\nWhat is shown? ASSISTANT:"
    calplug generate --model calplug-demo/cal-model-noise-0.4 [--image a.png ...]

``--model`` is a folder written by ``save_pretrained`` with the model and its processor (as
``calplug verify --model`` reads it; the prompts are padded on the left, as generate() wants), or
a ``calplug demo`` checkpoint (its own word vocabulary and prompt; without ``--image`` it answers
fresh synthetic images and prints what each shows). docs/decoding.md.
"""
from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import torch

from ..errors import CALConfigError
from ..processing import forward_arguments, process
from .common import load_model_and_processor, read_images, quiet_transformers_bars

DEFAULT_PROMPT = "USER: <image>\nDescribe the image. ASSISTANT: "
COLUMN = 44


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="folder written by save_pretrained (model and processor), or a `calplug demo` checkpoint")
    parser.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                        help="the text before the answer, with the processor's image placeholder (saved models)")
    parser.add_argument("--cd-alpha", type=float, default=1.0, help="contrast strength (default 1.0, VCD's)")
    parser.add_argument("--cd-beta", type=float, default=0.1,
                        help="plausibility cut: tokens below cd_beta x the top probability are out (default 0.1)")
    parser.add_argument("--contrast", default="drop", help="drop (default), mask, blur or noise")
    parser.add_argument("--noise-step", type=int, default=500, help="--contrast noise: diffusion step (default 500)")
    parser.add_argument("--blur-sigma", type=float, default=1.0, help="--contrast blur: sigma in pixels (default 1.0)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="new tokens per answer (default 32)")
    parser.add_argument("--samples", type=int, default=4,
                        help="demo checkpoints without --image: how many synthetic images (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images and of the noise contrast")
    parser.add_argument("--device", default="cpu", help="where to run (default: cpu)")


def run(args) -> int:
    import calplug

    if args.max_new_tokens < 1:
        raise CALConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    settings = calplug.CALConfig(noise_step=args.noise_step, blur_sigma=args.blur_sigma, seed=args.seed)
    path = Path(args.model)
    if (path / "calplug_vocab.json").is_file():
        model, inputs, names, decode, notes = demo_inputs(path, args.image, args.samples, args.seed)
    else:
        if not args.image:
            raise CALConfigError("give at least one --image (a saved model answers about your images)")
        model, inputs, names, decode = processor_inputs(path, args.image, args.prompt)
        notes = [""] * len(names)
    model = model.to(args.device).eval()
    inputs = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    width = inputs["input_ids"].shape[1]
    common = dict(max_new_tokens=args.max_new_tokens, pad_token_id=_pad_id(model))
    plain = model.generate(**inputs, do_sample=False, **common)
    contrastive = calplug.contrastive_generate(model, cd_alpha=args.cd_alpha, cd_beta=args.cd_beta,
                                               contrast=args.contrast, config=settings, **common, **inputs)
    print(f"calplug generate: {path.name} ({type(model).__name__}), greedy, up to "
          f"{args.max_new_tokens} new tokens; contrastive: contrast={args.contrast}, "
          f"cd_alpha={args.cd_alpha:g}, cd_beta={args.cd_beta:g}")
    print(side_by_side(names, [decode(row[width:]) for row in plain],
                       [decode(row[width:]) for row in contrastive], notes))
    return 0


def side_by_side(names: list[str], plain: list[str], contrastive: list[str], notes: list[str]) -> str:
    """One block per image: its name, then the two answers in columns (wrapped), then a note."""
    name_width = max([5] + [len(n) for n in names]) + 2
    lines = [f"{'image':<{name_width}}{'plain':<{COLUMN + 2}}contrastive"]
    for name, a, b, note in zip(names, plain, contrastive, notes):
        left = textwrap.wrap(a, COLUMN) or [""]
        right = textwrap.wrap(b, COLUMN) or [""]
        for i in range(max(len(left), len(right))):
            lines.append(f"{name if i == 0 else '':<{name_width}}"
                         f"{left[i] if i < len(left) else '':<{COLUMN + 2}}"
                         f"{right[i] if i < len(right) else ''}".rstrip())
        if note:
            lines.append(f"{'':<{name_width}}({note})")
    return "\n".join(lines)


def _pad_id(model) -> int:
    for cfg in (model.generation_config, getattr(model.config, "text_config", None), model.config):
        pad = getattr(cfg, "pad_token_id", None) if cfg is not None else None
        if pad is not None:
            return int(pad)
    return 0


def processor_inputs(path: Path, images: list[str], prompt: str):
    """A saved model and its processor's left-padded inputs: one prompt per image."""
    model, processor = load_model_and_processor(
        path, fix="call calplug.contrastive_generate(model, **inputs) yourself (docs/decoding.md)")
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    pil = read_images(images, "calplug generate")
    batch = dict(process(processor, pil, [prompt] * len(pil), padding=True))

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    return model, forward_arguments(model, batch), [Path(p).name for p in images], decode


def demo_inputs(path: Path, images: list[str], samples: int, seed: int):
    """A ``calplug demo`` checkpoint and its prompt for ``images`` (32 x 32, as the demo draws
    them), or for ``samples`` fresh synthetic images, each with what it shows."""
    from transformers import LlavaForConditionalGeneration

    from . import synthetic

    vocab = synthetic.Vocab.load(path / "calplug_vocab.json")
    with quiet_transformers_bars():
        model = LlavaForConditionalGeneration.from_pretrained(path)
    if images:
        import numpy as np
        from PIL import Image

        size = synthetic.IMAGE_SIZE
        arr = np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size)), dtype=np.float32)
                        for p in images])
        pixels = torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0
        names, notes = [Path(p).name for p in images], [""] * len(images)
    else:
        if samples < 1:
            raise CALConfigError(f"--samples must be >= 1, got {samples}")
        data = synthetic.make_set(samples, seed=3_000_000 + seed)
        pixels = data.pixel_values
        names = [f"sample {i}" for i in range(samples)]
        notes = ["image shows: " + " ".join(s.visual()[a] for a in synthetic.ATTRIBUTES) for s in data.scenes]
    ids = torch.tensor([synthetic.prompt_ids(vocab)] * pixels.shape[0])

    def decode(row):
        words = vocab.decode(row.tolist())
        return " ".join(words[:words.index("<eos>") + 1] if "<eos>" in words else words)

    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels.contiguous())
    return model, inputs, names, decode, notes
