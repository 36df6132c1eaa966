"""The registry of integration cases that tests/test_properties.py checks, one property at a time.

A case is one integration, with one modality and one layout of the batch: a tiny seeded model and
a training batch, the two-forward reference of the spec written by the test itself (never by
calplug), and where the image positions of the decoder sequence are. Adding an integration to
calplug means adding its cases here (and its tiny model to the helpers it uses); every property
then runs on it. Case ids start with the kind (``testing-``, ``hf-``, ``llava_style-``), which the
tox envs select by (``-k``) and tests/support_matrix.py reads.

Each batch holds padding, a text-only sample at index 2 and image (or video) samples before it.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import pytest
import torch

import _hf_families as hf
import _hf_kinds as kinds
import _llava_style_models as styled
from _skips import skip_unrunnable_family
from calplug.reference import reference_at, reference_forwards

SETTING = (0.0, 5.0, 3)  # alpha, beta, window: weights that vary on a random-init model
POOLED = (1.0, 5.0, 3)   # the published default: alpha 1 clamps most gaps of a random-init model
                         # to 1, so flat pooling's edges (sequence ends, padding) decide the loss


@dataclasses.dataclass
class Reference:
    """The spec computed by the test: loss, flat weights and gaps, and the decoder sequence's
    labels, image positions and padding mask. ``forwards``: the two forwards it came from
    (`calplug.reference.reference_forwards`), from which `at` computes another setting."""

    loss: torch.Tensor
    weights: torch.Tensor
    gaps: torch.Tensor
    labels: torch.Tensor
    visual: torch.Tensor
    attention: torch.Tensor
    samples: torch.Tensor | None = None   # bool [B]: the samples the image reaches (default: with a visual position)
    forwards: tuple | None = None

    @property
    def with_image(self) -> torch.Tensor:
        return self.visual.any(1) if self.samples is None else self.samples

    def at(self, alpha: float, beta: float, window: int) -> "Reference":
        """The spec at another setting, from the same two forwards (no model call)."""
        loss, gaps, weights = reference_at(self.forwards, self.labels, alpha, beta, window)
        return dataclasses.replace(self, loss=loss, gaps=gaps, weights=weights)


@dataclasses.dataclass
class Layout:
    """The decoder sequence of a batch: labels, image positions and padding mask, ``[B, L]``."""

    labels: torch.Tensor
    visual: torch.Tensor
    attention: torch.Tensor
    samples: torch.Tensor | None = None   # bool [B]: the samples the image reaches (default: with a visual position)

    @property
    def with_image(self) -> torch.Tensor:
        return self.visual.any(1) if self.samples is None else self.samples

    @property
    def text_rows(self) -> torch.Tensor:
        """Shifted rows at kept (text, not padding) positions: where drop must equal mask."""
        return (self.attention.bool() & ~self.visual)[:, :-1]

    @property
    def removed_rows(self) -> torch.Tensor:
        return ~self.text_rows


@dataclasses.dataclass
class Case:
    id: str
    build: Callable[["Env"], tuple]                      # -> (model in train mode, batch)
    reference: Callable[..., Reference]                  # (model, batch, alpha, beta, window)
    layout: Callable[..., Layout]                        # (model, batch)
    decoder: Callable                                    # model -> the text decoder module
    settings: tuple = (SETTING, POOLED)                  # (alpha, beta, window) of the faithful test
    gap_atol: float = 1e-6                               # faithful gaps / weights
    grad_atol: float = 1e-8                              # faithful gradients (rel 1e-5 + atol)
    drop_atol: float = 1e-4                              # drop vs mask on text rows (rtol 1e-4)
    min_weight_std: float = 1e-3                         # faithful weights really vary
    far_from_plain: bool = True                          # ... and move the loss off plain CE
    grad_names: tuple = ()                               # parameters that must get a gradient
    generate_inputs: Callable | None = None              # model -> inputs of generate(), or None
    check: Callable | None = None                        # (model, batch, Reference) extra faithful checks
    contrast: str = "mask"                               # the faithful contrast: the published mask, or
                                                         # drop where mask holes are not honoured
    decode_inputs: Callable | None = None                # (model, lengths, seeds) -> left-padded inputs
                                                         # of generate(), one image sample per length
    kind: str = kinds.POSITIONS                          # where the image is (tests/_hf_kinds.py): at
                                                         # positions of the decoder sequence, or elsewhere
    label_shift: int = 1                                 # logits row i predicts label i + shift
    text_only: bool = True                               # sample 2 of the batch is text-only
    vision: Callable | None = None                       # model -> the vision tower
    head: Callable = lambda model: model.get_output_embeddings()  # model -> the output projection
    logit_prefix: Callable | None = None                 # model -> rows the model's logits have in
                                                         # front of the text (GIT's image), or None

    def text_logits(self, model, logits: torch.Tensor) -> torch.Tensor:
        """The model's logits at the text's rows (those the labels align with)."""
        return logits if self.logit_prefix is None else logits[:, self.logit_prefix(model):]

    def without_labels(self, model, batch) -> dict:
        """The batch as a call without labels: an encoder-decoder model then needs its decoder
        inputs (the labels shifted right, as it would shift them)."""
        call = {k: v for k, v in batch.items() if k != "labels"}
        if self.label_shift == 0:
            call["decoder_input_ids"] = kinds.decoder_inputs(model, batch["labels"])
        return call

    def own_loss(self, model, batch) -> torch.Tensor:
        out = model(**batch)
        return out[0] if isinstance(out, tuple) else out.loss


class Env:
    """What cases share within a test session: a tiny CLIP tower saved once (LLaVA codebases)."""

    def __init__(self, tmp_path_factory):
        self._factory = tmp_path_factory
        self._clip = None

    def clip_folder(self) -> str:
        if self._clip is None:
            self._clip = styled.save_tiny_clip(str(self._factory.mktemp("openai-tiny-clip")))
        return self._clip


# -- transformers classes: calplug's tiny Llava and every family of tests/_hf_families.py --------
def hf_reference(model, batch, alpha, beta, window, family=None) -> Reference:
    """Spec steps 1-8 by the independent reference (`calplug.reference.reference_forwards`): the
    model's own training forward, and its own forward again with the image taken out of what the
    text decoder receives: attention to the image positions removed in whatever mask the decoder
    takes (2-D with holes; built 4-D masks, or a dict of them per layer type, with the image key
    columns blocked), or, for a decoder whose layers do not honour mask holes
    (``family.drop_only``), the image positions removed from its sequence; a decoder that numbers
    positions from its mask (OPT) is handed the first forward's numbering (``family.positions``).
    Full logits as the model makes them (soft-capped or scaled where its forward does), flattened
    pooling."""
    layout = hf_layout(model, batch)
    contrast = "drop" if family is not None and family.drop_only else "mask"
    positions = family.positions(model, batch) if family is not None and family.positions else None
    forwards = reference_forwards(model, batch, layout.visual, contrast, decoder=hf_decoder(model),
                                  positions=positions)
    loss, gaps, weights = reference_at(forwards, batch["labels"], alpha, beta, window)
    return Reference(loss, weights, gaps, batch["labels"], layout.visual, layout.attention,
                     forwards=forwards)


def hf_layout(model, batch) -> Layout:
    return Layout(batch["labels"], hf.visual_positions(model, batch["input_ids"]),
                  batch["attention_mask"])


def hf_decoder(model):
    return hf.decoder_and_head(model)[0]


def left_padded(samples: list[dict], finish=None, model=None) -> dict:
    """One-sample batches merged into one left-padded batch, as a processor pads for generate():
    ``[1, L]`` inputs padded on the left (ids 0, mask 0, labels -100, other ids 0), every other
    tensor (pixels, grids, sizes) concatenated; ``finish`` (the family's) is run again on the
    result, then labels are dropped."""
    width = max(s["input_ids"].shape[1] for s in samples)
    pad = {"attention_mask": 0, "labels": -100}
    merged = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if values[0] is None:
            merged[key] = None
        elif all(v.dim() == 2 and v.shape == x["input_ids"].shape for v, x in zip(values, samples)):
            merged[key] = torch.cat([torch.nn.functional.pad(v, (width - v.shape[1], 0), value=pad.get(key, 0))
                                     for v in values])
        else:
            merged[key] = torch.cat(values)
    if finish is not None:
        merged = finish(model, merged)
    return {k: v for k, v in merged.items() if k != "labels"}


def _video_works(name) -> bool:
    return not (name == "llava_onevision" and (4, 49) <= hf.tf_version() < (4, 50))


def family_case(name: str, kind: str, padding_side: str) -> Case:
    family = hf.FAMILIES[name]
    kinds = ("image", "image", None) if kind == "image" else family.video_kinds

    def build(env):
        skip_unrunnable_family(family)
        if kind == "video" and not _video_works(name):
            pytest.skip("transformers 4.49's LlavaOnevision cannot take videos (its video check reads "
                        "the image mask: UnboundLocalError / false size mismatch); use 4.45 or >= 4.50")
        model = family.build(0).train()
        return model, hf.make_batch(family, model, kinds=kinds, padding_side=padding_side)

    def generate_inputs(model):
        one = hf.make_batch(family, model, kinds=("image",), lengths=(6,))
        return {k: v for k, v in one.items() if k != "labels"}

    def decode_inputs(model, lengths, seeds):
        return left_padded([hf.make_batch(family, model, kinds=("image",), lengths=(n,), seed=s)
                            for n, s in zip(lengths, seeds)], family.finish, model)

    first = (kind, padding_side) == ("image", "right")
    return Case(f"hf-{name}-{kind}-{padding_side}", build,
                functools.partial(hf_reference, family=family), hf_layout, hf_decoder,
                drop_atol=1e-5, contrast="drop" if family.drop_only else "mask",
                grad_atol=family.grad_atol, head=lambda model: hf.decoder_and_head(model)[1],
                generate_inputs=generate_inputs if first else None,
                decode_inputs=decode_inputs if first else None)


def kind_case(name: str, padding_side: str) -> Case:
    """A family of the kinds whose image is not spliced at placeholder ids (tests/_hf_kinds.py):
    its layout is the decoder sequence calplug runs (for an encoder-decoder model one position
    longer than the labels, which get an ignored position in front: docs/transformers.md)."""
    family = kinds.KINDS[name]

    def build(env):
        reason = family.skip_reason()
        if reason is not None:
            pytest.skip(reason)
        model = family.build(0).train()
        return model, family.batch(model, padding_side, family.text_only)

    def layout(model, batch):
        labels, attention = batch["labels"], batch["attention_mask"]
        if family.kind == kinds.SEQ2SEQ:
            B = labels.shape[0]
            labels = torch.cat([labels.new_full((B, 1), -100), labels], 1)
            attention = torch.ones_like(labels)
        visual = (family.visual(model, batch) if family.visual is not None
                  else torch.zeros_like(labels, dtype=torch.bool))
        return Layout(labels, visual, attention, family.with_image(model, batch))

    def reference(model, batch, alpha, beta, window):
        loss, gaps, weights = family.reference(model, batch, alpha, beta, window)
        at = layout(model, batch)
        return Reference(loss, weights, gaps, batch["labels"], at.visual, at.attention, at.samples)

    def generate_inputs(model):
        one = family.batch(model, "right", False)
        return {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in one.items() if k != "labels"}

    return Case(f"hf-{name}-image-{padding_side}", build, reference, layout, family.decoder,
                drop_atol=1e-5, kind=family.kind, label_shift=family.label_shift,
                text_only=family.text_only, vision=family.vision, head=family.head,
                logit_prefix=family.prefix,
                generate_inputs=generate_inputs if padding_side == "right" else None)


def tiny_llava_case(padding_side: str, attn: str) -> Case:
    """calplug.testing's tiny Llava, the model of the demo and the bench: three clamp settings,
    both paddings, eager and SDPA attention."""

    def build(env):
        from calplug.testing import llava_batch, tiny_llava

        model = tiny_llava(seed=0, attn_implementation=attn).train()
        return model, llava_batch(model, padding_side=padding_side)

    def generate_inputs(model):
        from calplug.testing import llava_batch

        one = llava_batch(model, lengths=(6,), with_image=(True,))
        return {k: v for k, v in one.items() if k != "labels"}

    def decode_inputs(model, lengths, seeds):
        from calplug.testing import llava_batch

        return left_padded([llava_batch(model, lengths=(n,), with_image=(True,), seed=s)
                            for n, s in zip(lengths, seeds)])

    return Case(f"testing-tiny_llava-{attn}-{padding_side}", build, hf_reference, hf_layout,
                hf_decoder, settings=(SETTING, POOLED, (0.0, 0.05, 1)),
                min_weight_std=0.01,
                generate_inputs=generate_inputs if padding_side == "right" else None,
                decode_inputs=decode_inputs if padding_side == "right" else None)


# -- LLaVA-style codebases: haotian-liu LLaVA, LLaVA-NeXT, MGM (tests/_llava_style_models.py) ----
# Cuts answers of samples 0 and 3 and the second image of sample 1, keeping some supervised
# tokens after an image (with every image sample's answer cut, alpha = 0 leaves no weight but
# round-off, which the 1e-6 of the normaliser then amplifies).
TRUNCATE = {"pad": 24, "anyres": 62, "aux": 24}
LAYOUTS = {  # config overrides and batch options
    "right": (dict(tokenizer_padding_side="right"), dict(padding_side="right")),
    "left": (dict(tokenizer_padding_side="left"), dict(padding_side="left")),
    "left-truncated": (dict(tokenizer_padding_side="left", tokenizer_model_max_length=None),
                       dict(padding_side="right")),
}


def llava_style_reference(model, batch, alpha, beta, window) -> Reference:
    """Spec steps 1-8 by hand: the upstream splice, two full forwards of the language model with
    full logits (the second with attention to image positions removed), flattened pooling."""
    pos, mask, embeds, labels = styled.splice(model, batch)
    decoder = model.get_model()
    logits = model.lm_head(decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=pos)[0]).float()
    image = styled.image_positions(model, embeds, mask)
    with torch.no_grad():
        hidden = decoder(inputs_embeds=embeds, attention_mask=mask * (~image).to(mask.dtype),
                         position_ids=pos)[0]
        logits_wo = model.lm_head(hidden).float()
    forwards = (logits, logits_wo, None)
    loss, gaps, weights = reference_at(forwards, labels, alpha, beta, window)
    return Reference(loss, weights, gaps, labels, image, mask, forwards=forwards)


def llava_style_layout(model, batch) -> Layout:
    _, mask, embeds, labels = styled.splice(model, batch)
    return Layout(labels, styled.image_positions(model, embeds, mask), mask)


def llava_style_case(codebase: str, variant: str, backbone: str, layout: str) -> Case:
    overrides, batch_options = LAYOUTS[layout]
    if "tokenizer_model_max_length" in overrides:
        overrides = dict(overrides, tokenizer_model_max_length=TRUNCATE[variant])

    def build(env):
        styled.codebase(codebase)
        model = styled.build(codebase, env.clip_folder(), variant=variant, backbone=backbone,
                             **overrides)
        return model, styled.batch(model, variant=variant, **batch_options)

    def truncated(model, batch, ref):
        """The splice really cut the sequence: fewer supervised labels than without the cut."""
        assert ref.attention.shape[1] == TRUNCATE[variant]
        model.config.tokenizer_model_max_length = None
        full = styled.splice(model, batch)[3]
        model.config.tokenizer_model_max_length = TRUNCATE[variant]
        assert full.shape[1] > ref.attention.shape[1]
        assert int((full != -100).sum()) > int((styled.splice(model, batch)[3] != -100).sum())

    grad_names = ("lm_head.weight", "mm_projector")
    if variant == "anyres":
        grad_names += ("image_newline",)        # spatial_unpad's newline feature
    if variant == "aux":
        grad_names += ("vlm_uni_aux_projector",)  # MGM's images_aux branch
    return Case(f"llava_style-{codebase}-{variant}-{backbone}-{layout}", build,
                llava_style_reference, llava_style_layout, lambda model: model.get_model(),
                settings=(SETTING, POOLED, (0.0, 0.05, 1)),
                # atol: MGM's aux branch has key-projection biases (vlm_uni_aux_projector) whose
                # gradient is 0 in exact arithmetic (softmax is shift-invariant) and ~1e-8 of
                # round-off in fp32.
                gap_atol=1e-5, grad_atol=1e-7, min_weight_std=0.01, grad_names=grad_names,
                # the weights vary, but on these tiny LLaVA models they move the loss by less
                # than 1e-4 of its value (4e-4 of 7.0), which the faithful check already pins
                far_from_plain=False,
                check=truncated if "truncated" in layout else None)


# (codebase, variant, backbone): 1.5 'pad' and 1.6 'anyres' + 'spatial_unpad' on every codebase
# that has them; the Qwen2 backbone of LLaVA-NeXT; MGM with its high-resolution branch ('aux': a
# ConvNeXt tower fed `images_aux`, mined into the CLIP features).
LLAVA_STYLE = [
    ("llava", "pad", "llama"), ("llava", "anyres", "llama"), ("llava", "pad", "mistral"),
    ("llava-next", "pad", "llama"), ("llava-next", "anyres", "llama"), ("llava-next", "anyres", "qwen2"),
    ("mgm", "pad", "llama"), ("mgm", "aux", "llama"),
]


def _all_cases() -> list[Case]:
    cases = [tiny_llava_case(side, attn) for attn in ("eager", "sdpa") for side in ("right", "left")]
    for name, family in hf.FAMILIES.items():
        for kind in ("image", "video") if family.video else ("image",):
            cases += [family_case(name, kind, side) for side in ("right", "left")]
    cases += [kind_case(name, side) for name in kinds.KINDS for side in ("right", "left")]
    cases += [llava_style_case(*spec, layout) for spec in LLAVA_STYLE for layout in LAYOUTS]
    return cases


CASES = _all_cases()


def setting_id(setting) -> str:
    alpha, beta, window = setting
    return f"a{alpha:g}-b{beta:g}-w{window}"


def params(cases=None, with_settings: bool = False):
    """pytest params of ``cases`` (default: all), with ids; ``with_settings`` appends the case's
    faithful settings to its id (``hf-llava-image-right-a0-b5-w3+a1-b5-w3``): one test checks
    them all from one build and one pair of reference forwards, and tests/support_matrix.py reads
    from the id which settings a family passed."""
    out = []
    for case in CASES if cases is None else cases:
        suffix = "-" + "+".join(map(setting_id, case.settings)) if with_settings else ""
        out.append(pytest.param(case, id=case.id + suffix))
    return out
