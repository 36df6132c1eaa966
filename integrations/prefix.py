"""The image-prefix kind: transformers VLMs that prepend the image's embeddings to the text inside
the model, with no placeholder ids in ``input_ids``. GIT (``GitForCausalLM``): ``GitModel``
embeds the text (word and position embeddings, then its LayerNorm), runs the vision tower and its
projection, concatenates ``[image; text]`` and runs its transformer with the image block attending
to itself bidirectionally and the text causally, after the whole image. Its logits have the image's
rows in front; its own loss reads the rows after them (``logits[:, image rows:-1]`` against
``labels[:, 1:]``).

**The image-blind pass** is the model's own text on its own: ``GitModel`` called without
``pixel_values``. It embeds the same text at the same positions (GIT numbers the text from 0
whether or not an image comes first) and runs it causally: exactly what the text rows of the main
pass would compute if the image were not there. Its rows line up one-to-one with the main pass's
text rows, so the engine sees a plain causal sequence: ``MainPass.logits`` are the text rows,
``labels`` the batch's own (row i predicts label i + 1, GIT's own shift), no visual positions,
every sample reached by the image (GIT repeats one image per sample), and ``image_free`` hands the
decoder no ``pixel_values``. ``MainPass.prefix_rows`` tells the engine how many rows the output
projection received in front (the logit self-check and ``loss_chunk`` skip them).

**Contrasts.** ``drop`` and ``mask`` are the same image-free pass (no position is hidden or
removed); ``blur`` hands ``GitModel`` blurred pixels (its output's text rows are read);
``patch_mask`` is refused: the image has no positions in the text's sequence to hide a share of.
The independent reference (`calplug.reference.reference_image_free_step`) is the model's own
forward without ``pixel_values``, its logits compared with the text rows of the first forward
(`ReferencePass.prefix`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch
from torch import nn

from calplug.errors import CALInputError, UnsupportedModelError
from calplug.hookspecs import Integration, MainPass, ReferencePass, hookimpl
from calplug.inputs import has_pixels
from calplug.reference import without_arguments

from . import compat, text_decoder
from .capture import transform_pixels

KIND = "the image-prefix kind"
NO_POSITIONS = ("{family} prepends the image's embeddings to the text inside the model, not at "
                "positions of the text's sequence, so there is no share of image positions for "
                "patch_mask to hide; use drop (the default), mask (the same image-free pass here) "
                "or blur")


def git_decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """GIT: ``GitModel`` (it embeds the text and prepends the image) and the output projection."""
    inner = getattr(model, "git", None)
    if not isinstance(inner, nn.Module):
        raise UnsupportedModelError(f"cannot find the GitModel of {type(model).__name__} (.git)")
    return inner, model.get_output_embeddings()


def git_image_rows(model: nn.Module) -> int:
    """The rows GIT's image adds in front of the text: the count its own loss skips
    (``image_patch_tokens`` of its attention layers: patches + 1, times the frames it embeds)."""
    return int(model.git.encoder.layer[0].attention.self.image_patch_tokens)


@dataclasses.dataclass(frozen=True)
class PrefixFacts:
    """One class of the kind.

    decoder_and_head: ``fn(model) -> (decoder, head)``: the module that embeds the text and
                      prepends the image (called by the model with keyword arguments), and the
                      output projection.
    image_rows:       ``fn(model) -> int``: the rows the image adds in front of the text.
    image_kwargs:     the decoder's arguments that carry the image: None in the image-free pass.
    pixel_keys:       forward arguments holding images ``[..., H, W]`` (``blur``).
    """

    family: str
    key: str
    class_name: str
    since: tuple[int, int]
    decoder_and_head: Callable[[nn.Module], tuple[nn.Module, nn.Module]]
    image_rows: Callable[[nn.Module], int]
    image_kwargs: tuple[str, ...] = ("pixel_values",)
    pixel_keys: tuple[str, ...] = ("pixel_values",)
    broken_ranges: tuple = ()  # ((first, fixed, reason),): releases broken upstream, refused


GIT_LOSS = (
    "transformers {version}'s GitForCausalLM computes its own loss by handing the text rows' logits "
    "and labels[:, 1:], both flattened, to ForCausalLMLoss, which shifts the labels once more: the "
    "model's own training objective pairs each row with the token after its target (4.49-5.14; "
    "4.48 used a plain cross-entropy, 5.15 passes shift_labels). calplug cannot check CAL against it. "
    "Use transformers 4.45-4.48 or >= 5.15")
FACTS: dict[str, PrefixFacts] = {f.class_name: f for f in (
    PrefixFacts("GIT", "git", "GitForCausalLM", (4, 45), git_decoder_and_head, git_image_rows,
                broken_ranges=(((4, 49), (5, 15), GIT_LOSS),)),
)}


def facts_of(model: nn.Module) -> PrefixFacts:
    return compat.facts_row(model, FACTS, "image-prefix")


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    return facts_of(model).decoder_and_head(model)


class PrefixDecoder(text_decoder.ContrastDecoder):
    """The decoder as the contrast pass calls it: handed the text's token embeddings (a copy:
    GIT's embedding step adds its position embeddings to them in place), it returns the rows of
    the text, after whatever it prepends (the blurred image of ``blur``; nothing without pixels)."""

    def forward(self, **kwargs):
        embeds = kwargs["inputs_embeds"]
        kwargs["inputs_embeds"] = embeds.clone()
        (hidden,) = super().forward(**kwargs)
        return (hidden[:, hidden.shape[1] - embeds.shape[1]:],)


def _no_image(samples: torch.Tensor, names: tuple[str, ...]) -> dict:
    """`MainPass.image_free`: the decoder's image arguments, each None (for any samples)."""
    return {name: None for name in names}


def _rerun(transform, call: dict, facts: PrefixFacts) -> dict:
    """`MainPass.rerun_with_pixels`: the decoder runs the vision path itself; hand it the
    transformed pixels."""
    return {k: transform_pixels(call[k], transform) for k in facts.pixel_keys if call.get(k) is not None}


def prefix_main_pass(model: nn.Module, original_forward, call: dict) -> MainPass:
    facts = facts_of(model)
    labels = call.pop("labels")
    compat.check_full_logits(call)
    decoder, head = facts.decoder_and_head(model)
    call = text_decoder.without_cache(model, call)
    recorded = text_decoder.run_recorded(original_forward, call, decoder, head)
    full = text_decoder.logits_of(recorded.output)
    after, transform = text_decoder.head_map(model, recorded, full)
    given = has_pixels(call, facts.pixel_keys)
    rows = facts.image_rows(model) if given else 0
    text_call = {k: v for k, v in recorded.decoder_kwargs.items() if k not in facts.image_kwargs}
    kwargs = text_decoder.contrast_call(decoder, text_call)
    embeds = kwargs["inputs_embeds"]
    B, L = embeds.shape[:2]
    if tuple(labels.shape) != (B, L):
        raise CALInputError(f"labels of shape {tuple(labels.shape)} do not match the text of shape "
                            f"{(B, L)}: pass labels as [batch, seq_len] aligned with input_ids "
                            "(-100 where no loss is wanted)")
    if full.shape[1] != 1 and full.shape[1] != rows + L:  # 1: loss_chunk's last position only
        raise UnsupportedModelError(
            f"{type(model).__name__}: its logits have {full.shape[1]} rows for {L} text tokens, not "
            f"the {rows} image rows in front that calplug expects (transformers "
            f"{'.'.join(map(str, compat.transformers_version()))})")
    rerun = functools.partial(_rerun, call=call, facts=facts) if given else None
    return MainPass(
        output=recorded.output, logits=full if full.shape[1] == 1 else full[:, rows:], labels=labels,
        decoder=PrefixDecoder(decoder, after), lm_head=head, decoder_kwargs=kwargs,
        visual_mask=torch.zeros(B, L, dtype=torch.bool, device=embeds.device),
        attention_mask=text_decoder.padding_mask(kwargs, embeds),
        position_ids=text_decoder.positions(kwargs, embeds),
        image_samples=torch.full((B,), given, dtype=torch.bool, device=embeds.device),
        image_free=functools.partial(_no_image, names=facts.image_kwargs),
        rerun_with_pixels=rerun, logit_transform=transform, prefix_rows=rows)


@dataclasses.dataclass(frozen=True)
class MainPassOf:
    """`Integration.main_pass` (a plain record, not a closure: an enabled model pickles)."""

    def __call__(self, model: nn.Module, original_forward, call: dict) -> MainPass:
        return prefix_main_pass(model, original_forward, call)


def check(model: nn.Module) -> None:
    facts = facts_of(model)
    compat.require_release(facts.family, facts.since, broken_ranges=facts.broken_ranges)
    facts.decoder_and_head(model)


def refuses_contrast(model: nn.Module, contrast: str) -> str | None:
    if contrast == "patch_mask":
        return NO_POSITIONS.format(family=facts_of(model).family)
    return None


def reference_pass(model: nn.Module, batch: dict) -> ReferencePass:
    """The reference's image-free forward: the model's own without its image arguments; the first
    forward's image rows left out of its logits."""
    facts = facts_of(model)
    given = has_pixels(batch, facts.pixel_keys)
    ids = batch["input_ids"]
    # without labels: GIT's own loss skips its image rows whether or not an image came
    # (transformers 5.25: ValueError on a batch without pixel_values); the reference reads logits
    return ReferencePass(without_arguments(batch, facts.image_kwargs + ("labels",)),
                         torch.full((ids.shape[0],), given, dtype=torch.bool, device=ids.device),
                         prefix=facts.image_rows(model) if given else 0)


def refuses_decoding(model: nn.Module) -> str:
    """`Integration.decoding_refusal`: contrastive decoding builds its image-blind branch by
    leaving image positions out of the decoder's sequence and ``generate()``'s cache; this kind's
    image is a prefix the model prepends, and a branch of the text alone with its own cache is not
    built."""
    return (f"{facts_of(model).family} prepends the image inside the model (no image positions in "
            "input_ids); calplug's contrastive decoding builds its image-blind branch by leaving "
            "image positions out of the decoder's sequence and generate()'s cache, and a branch of "
            "the text alone with a cache of its own is not built")


PROVEN = {name: (f.family, f.key, KIND) for name, f in FACTS.items()}


def support_status(model_or_class) -> tuple[str, str] | None:
    return text_decoder.status_of(model_or_class, PROVEN, {})


INTEGRATIONS = [
    Integration(name=f"transformers-{facts.key}", model_classes=(facts.class_name,), main_pass=MainPassOf(),
                decoder_and_head=decoder_and_head, check=check, pixel_contrasts=bool(facts.pixel_keys),
                contrast_refusal=refuses_contrast, support_status=support_status,
                reference_pass=reference_pass, decoding_refusal=refuses_decoding)
    for facts in FACTS.values()
]


@hookimpl
def calplug_integrations():
    return INTEGRATIONS
