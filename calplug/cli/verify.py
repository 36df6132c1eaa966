"""``calplug verify``: the checks of calplug's family tests (`calplug.verify`), run on your model.

    calplug verify --model DIR --image a.png --caption "a red square" [--image ... --caption ...]
    calplug verify --tiny llava          # a tiny seeded Llava and its batch: a self-check

``--model`` is a folder written by ``save_pretrained`` holding the model and its processor; the
batch is built from ``--image`` / ``--caption`` pairs after one ``--prompt`` (unsupervised, with the
processor's image placeholder), padded on the right, captions supervised. Prints a pass/fail
table (docs/verify.md); exit status 0 when every check passes, 1 when one fails, 2 for usage errors.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..errors import CALConfigError, CALInputError
from ..gap import IGNORE_INDEX
from ..processing import forward_arguments, process
from .common import load_model_and_processor, read_images

DEFAULT_PROMPT = "USER: <image>\nDescribe the image. ASSISTANT: "


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="folder written by save_pretrained: the model and its processor")
    source.add_argument("--tiny", choices=["llava"],
                        help="check a tiny seeded Llava instead: a self-check of calplug on this machine")
    parser.add_argument("--image", action="append", default=[], help="--model: an image file (repeatable)")
    parser.add_argument("--caption", action="append", default=[], help="--model: its caption (repeatable)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                        help="--model: the unsupervised text before each caption, with the processor's image placeholder")
    parser.add_argument("--device", default="cpu", help="where to run the checks (default: cpu)")
    parser.add_argument("--no-gradients", action="store_true",
                        help="skip the gradient comparison (one backward pass and one set of gradients fewer)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the replacement pixels (and of --tiny's model)")


def run(args) -> int:
    from ..testing import tiny_llava_with_batch
    from ..verifying import verify

    if args.tiny is not None:
        if args.image or args.caption:
            raise CALConfigError("--image / --caption go with --model; --tiny builds its own batch")
        model, batch = tiny_llava_with_batch(seed=args.seed)
    else:
        model, batch = processor_batch(Path(args.model), args.image, args.caption, args.prompt)
    model = model.to(args.device)
    batch = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    report = verify(model, batch, gradients=not args.no_gradients, seed=args.seed)
    print(report.table())
    return 0 if report.passed else 1


def processor_batch(path: Path, images: list[str], captions: list[str], prompt: str):
    """A model saved with its processor, and one right-padded batch of image/caption pairs: the
    prompt (image placeholder included) and the padding are labelled -100, the captions are
    supervised."""
    if len(images) != len(captions) or not images:
        raise CALConfigError(f"give as many --caption as --image (got {len(images)} images, "
                             f"{len(captions)} captions), at least one of each")
    model, processor = load_model_and_processor(
        path, fix="build the batch yourself and call calplug.verify(model, batch) (docs/verify.md)")
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "right"
    pil = read_images(images, "calplug verify --model")
    texts = [prompt + caption for caption in captions]
    batch = dict(process(processor, pil, texts, padding=True))
    labels = batch["input_ids"].clone()
    for i, im in enumerate(pil):
        head = process(processor, [im], [prompt])["input_ids"][0]
        if not torch.equal(batch["input_ids"][i, :head.numel()], head):
            raise CALInputError("the tokens of the prompt alone are not a prefix of prompt + caption; "
                                "end --prompt with a space or newline")
        labels[i, :head.numel()] = IGNORE_INDEX
    if "attention_mask" in batch:
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    batch["labels"] = labels
    return model.train(), forward_arguments(model, batch)
