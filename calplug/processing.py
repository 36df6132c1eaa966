"""A conversation as the tensors a model trains on, made by the model's own processor: the chat
template formats the prompt side as training formats it, the processor expands the image
placeholders as the model expects them, and every assistant turn is supervised.

The supervised span of assistant turn ``k`` is found by rendering the conversation up to that turn
twice, before it (with the generation prompt) and through it: its tokens are those between where
the two renderings end in the whole conversation's tokens. Where no image follows, that point is
found from the end with the tokenizer alone (the text after it has no image to expand; the tail is
checked token for token); else by the processor on the rendering, whose tokens must be a prefix of
the whole (checked, else the sample is refused). So the span is exactly what the template wrote
for that turn: its text and the end-of-turn tokens the template adds, as LLaMA-Factory and
ms-swift supervise them. Rendering through the processor, not a re-implementation
of each family's expansion, keeps every family's own image tokens (counts that depend on the image
size included).

Also here: `process` (verify's batch of one image per caption) and `forward_arguments` (the
processor outputs a model's forward takes), shared by `calplug verify` and the audit.
"""
from __future__ import annotations

import inspect

import torch

from .errors import CALInputError, CALSampleError
from .gap import IGNORE_INDEX

IMAGE = "<image>"   # the placeholder LLaVA, LLaMA-Factory and ms-swift data write for an image


def process(processor, images: list, texts: list[str], **options) -> dict:
    """The processor's tensors for ``texts`` with one image each (flat image list, or one list
    per text for processors that want that)."""
    try:
        return processor(images=images, text=texts, return_tensors="pt", **options)
    except (ValueError, TypeError):
        return processor(images=[[im] for im in images], text=texts, return_tensors="pt", **options)


def process_one(processor, images: list, text: str) -> dict:
    """The processor's tensors for one text and the images its placeholders stand for, in order
    (none: a text-only call)."""
    if not images:
        return processor(text=[text], return_tensors="pt")
    try:
        return processor(images=images, text=[text], return_tensors="pt")
    except (ValueError, TypeError):
        return processor(images=[images], text=[text], return_tensors="pt")


def _processed(processor, images: list, text: str) -> dict:
    """`process_one`, its failure on this sample's images or text the sample's own error."""
    try:
        return process_one(processor, images, text)
    except (ValueError, TypeError, IndexError) as error:
        raise CALSampleError("processor", f"the processor cannot process this sample ({type(error).__name__}: "
                                          f"{' '.join(str(error).split())[:200]})") from error


def forward_arguments(model, batch: dict) -> dict:
    """The entries of a processor's output that the model's forward takes: some processors return
    more than a given release's forward accepts (the Llava processor's ``token_type_ids`` on
    transformers 4.45), and a forward without ``**kwargs`` raises on them."""
    parameters = inspect.signature(model.forward).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return batch
    return {k: v for k, v in batch.items() if k in parameters or k == "labels"}


def chat_template(processor) -> str | None:
    """The chat template training would format with: the processor's, else its tokenizer's."""
    template = getattr(processor, "chat_template", None)
    if template:
        return template
    return getattr(getattr(processor, "tokenizer", None), "chat_template", None) or None


def structured(messages: list[dict]) -> list[dict]:
    """``{"role", "content": str}`` messages with ``<image>`` placeholders in the text as the
    content lists chat templates read: ``{"type": "image"}`` where a placeholder was, the text
    around it kept as written (a newline after ``<image>`` included, as the frameworks keep it)."""
    out = []
    for m in messages:
        parts = m["content"].split(IMAGE)
        content = []
        for i, text in enumerate(parts):
            if i:
                content.append({"type": "image"})
            if text:
                content.append({"type": "text", "text": text})
        out.append({"role": m["role"], "content": content})
    return out


def render(processor, messages: list[dict], *, generation: bool) -> str:
    """The chat template's text for ``messages`` (structured), with the generation prompt."""
    try:
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    except Exception as error:  # a template raising on the data (a role it refuses, ...)
        raise CALSampleError("template", f"the chat template cannot format this conversation "
                                         f"({type(error).__name__}: {' '.join(str(error).split())[:200]})") from error


def _images_in(messages: list[dict]) -> int:
    return sum(c["type"] == "image" for m in messages for c in m["content"])


def _boundary(processor, messages: list[dict], images: list, ids: torch.Tensor, whole: dict, *,
              generation: bool, turn: int) -> int:
    """Where the rendering of ``messages`` (the conversation up to a turn) ends in ``ids``, the
    whole conversation's tokens. When no image comes after that point, the tokens after it are
    plain text: their count is found with the tokenizer alone (no second pass over the images),
    checked against the whole sequence's tail; otherwise the processor runs on the rendering and
    its tokens must be a prefix of ``ids``."""
    text = render(processor, messages, generation=generation)
    tokenizer = getattr(processor, "tokenizer", None)
    if (tokenizer is not None and _images_in(messages) == len(images) and whole["text"].startswith(text)):
        full, head = whole.setdefault("plain", tokenizer(whole["text"])["input_ids"]), tokenizer(text)["input_ids"]
        tail = len(full) - len(head)
        if (full[:len(head)] == head and 0 <= tail <= ids.numel()
                and ids[ids.numel() - tail:].tolist() == full[len(head):]):
            return ids.numel() - tail
    head = _processed(processor, images[:_images_in(messages)], text)["input_ids"][0]
    if head.numel() > ids.numel() or not torch.equal(ids[:head.numel()], head):
        where = "before" if generation else "through"
        raise CALSampleError("template", f"the chat template's text {where} assistant turn {turn} does not "
                                         "tokenize to a prefix of the whole conversation's tokens, so its "
                                         "answer tokens cannot be found")
    return head.numel()


def encode_conversation(processor, messages: list[dict], images: list, *,
                        max_length: int | None = None) -> dict:
    """The processor's tensors (batch of one) for a conversation (``{"role", "content"}``
    messages, roles system / user / assistant, ``<image>`` placeholders in the text, ``images``
    the PIL images they stand for, in order), with ``labels``: every assistant turn's tokens, -100
    elsewhere. Raises `CALSampleError` for a sample that cannot be scored (no assistant turn, an
    empty answer, longer than ``max_length`` tokens, a template whose turns do not tokenize as
    prefixes)."""
    conv = structured(messages)
    turns = [k for k, m in enumerate(conv) if m["role"] == "assistant"]
    if not turns:
        raise CALSampleError("no-answer", "no assistant turn: nothing in the sample is supervised")
    if not any(c.get("text", "").strip() for k in turns for c in conv[k]["content"]):
        raise CALSampleError("no-answer", "the answer is empty: no assistant turn has text to score")
    if _images_in(conv) != len(images):
        raise CALSampleError("format", f"{_images_in(conv)} image placeholders but {len(images)} images")
    text = render(processor, conv, generation=False)
    whole = dict(_processed(processor, images, text))
    ids = whole["input_ids"][0]
    if max_length is not None and ids.numel() > max_length:
        raise CALSampleError("too-long", f"too long: {ids.numel()} tokens, more than the model's limit of "
                                         f"{max_length} (--max-length)")
    labels = torch.full_like(ids, IGNORE_INDEX)
    known = dict(text=text)   # what `_boundary` reuses across turns: the whole text, its plain tokens
    for n, k in enumerate(turns, start=1):
        start = _boundary(processor, conv[:k], images, ids, known, generation=True, turn=n)
        end = (ids.numel() if k + 1 == len(conv) else
               _boundary(processor, conv[:k + 1], images, ids, known, generation=False, turn=n))
        labels[start:end] = ids[start:end]
    if not bool((labels != IGNORE_INDEX).any()):
        raise CALSampleError("no-answer", "no supervised token: the template wrote no token for the answer")
    whole["labels"] = labels[None]
    return whole


def collate(samples: list[dict], pad_id: int) -> dict:
    """One right-padded batch of `encode_conversation` outputs: ``[1, L]`` tensors (input ids,
    attention mask, labels, token types) padded to the longest; every other tensor (pixels, image
    sizes, grids) concatenated along its first dimension, as the processor batches them. Raises
    `CALInputError` when those cannot be concatenated (the caller then scores one at a time)."""
    length = max(s["input_ids"].shape[1] for s in samples)
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX}
    batch = {}
    for key in samples[0]:
        values = [s.get(key) for s in samples]
        if any(v is None for v in values) or not all(isinstance(v, torch.Tensor) for v in values):
            if any(isinstance(v, torch.Tensor) for v in values):
                raise CALInputError(f"cannot batch {key!r}: some samples lack it")
            continue
        if all(v.dim() == 2 and v.shape == s["input_ids"].shape for v, s in zip(values, samples)):
            out = torch.full((len(values), length), fill.get(key, 0), dtype=values[0].dtype)
            for i, v in enumerate(values):
                out[i, :v.shape[1]] = v[0]
            batch[key] = out
        else:
            try:
                batch[key] = torch.cat(values)
            except RuntimeError as error:
                raise CALInputError(f"cannot batch {key!r} ({error})") from error
    return batch
