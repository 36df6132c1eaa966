"""The family-facts table of calplug's generic placeholder-token integration, the refusals table,
and the support status of any transformers class: model knowledge as data, no CAL math.

Every transformers VLM calplug supports splices image (and video) features into the decoder's
input embeddings at placeholder token ids and then calls one text decoder. One integration
(`integrations/transformers_vlm.py`) serves them all: visual positions are the placeholder ids,
the decoder call is captured, and the contrast pass re-runs the decoder. What differs between
families is written here, one `FamilyFacts` row per transformers class, never as a copied
forward. Classes where "the same text without the image" is not a matter of placeholder positions
are refused by name, with the reason, in `REFUSED`.

Interface for ``calplug verify`` and the support matrix (stable; extend, do not rename):

* ``FAMILIES: dict[str, FamilyFacts]``: class name -> the facts the generic integration uses.
  ``FamilyFacts.proven`` is True when calplug's own tests have cases for the family
  (tests/cases.py, ids ``hf-<key>-...``; ``FamilyFacts.key`` is that ``<key>``);
  ``FamilyFacts.unproven_reason`` says why not otherwise.
* ``REFUSED: dict[str, str]``: class name -> why calplug refuses it, and what would be needed.
* ``support_status(class_name) -> (status, reason)`` with status ``"proven"`` (a row of
  `FAMILIES` with test cases), ``"refused"`` (in `REFUSED`, or the generic rule does not apply:
  the reason says which part) or ``"matched"`` (the generic integration accepts the class, but no
  family case in calplug's tests proves it: ``calplug verify`` checks it on the user's model).
  Works from the class name alone (the installed transformers' class and its default config).
* ``generic_refusal(model) -> str | None``: the same rule on a model instance (its real config):
  None when the generic integration accepts it.
* ``MATCHED_WARNING``: the text of the one-time warning `calplug.enable` gives a matched class.
"""
from __future__ import annotations

import dataclasses

from .compat import IMAGE_PLACEHOLDER_NAMES as IMAGE_ONLY
from .compat import PLACEHOLDER_NAMES as IMAGE_VIDEO

# Pixel arguments that hold images as [..., 3, H, W] tensors: pixel contrasts (blur) transform them.
IMAGE_PIXELS = ("pixel_values", "pixel_values_videos")

HOLES_IGNORED = (
    "its decoder has {what} that do not honour holes in the attention mask: a masked position is "
    "zeroed but still advances the {state}, so contrast='mask' (and 'patch_mask') would not be "
    "'the same text without the image'. contrast='drop' removes the image positions and is the "
    "exact no-image pass: use it (the default)"
)


@dataclasses.dataclass(frozen=True)
class FamilyFacts:
    """What the generic integration needs to know about one transformers class.

    family:           display name (support matrix, messages).
    key:              the tests' family key: case ids ``hf-<key>-<modality>-<padding>``.
    class_name:       the transformers class.
    since:            first transformers release (major, minor) that has the class; enable refuses
                      older ones. Releases up to 6.0 are accepted (``compat.require_version``).
    placeholders:     config attributes whose ids mark visual positions in ``input_ids``.
    mrope:            the decoder takes ``[3, B, L]`` rotary positions (M-RoPE); when the model hands
                      it ``None`` they are 0..L-1 on every axis.
    visual_extras:    decoder keyword arguments that carry only visual information (Qwen3-VL's
                      deepstack): ``drop`` clears them.
    router_aux:       the model adds ``text_config.router_aux_loss_coef * output.aux_loss`` to its
                      loss when given labels (MoE load balancing): kept as `MainPass.extra_loss`.
    logit_softcap:    text-config attribute of the final logit soft-capping the forward applies
                      after ``lm_head`` (``tanh(x / c) * c``), from ``logit_softcap_since``.
    holes_ignored:    why ``mask`` / ``patch_mask`` are refused (layers that ignore mask holes);
                      empty when they are fine.
    pixel_keys:       forward arguments holding images ``[..., 3, H, W]``: pixel contrasts (blur)
                      re-run the vision path on them. Empty: pixels are pre-cut patches, no blur.
    labels_in_main_pass_below: before this release the model builds its attention mask from
                      ``labels`` (PaliGemma's prefix-LM): the main pass then passes them on.
    broken:           ``((version, reason), ...)`` transformers releases whose forward of this class
                      is broken upstream: enable refuses them with the reason.
    proven:           calplug's tests have family cases for it (tests/cases.py).
    unproven_reason:  why not, when ``proven`` is False.
    """

    family: str
    key: str
    class_name: str
    since: tuple[int, int]
    placeholders: tuple[str, ...] = IMAGE_VIDEO
    mrope: bool = False
    visual_extras: tuple[str, ...] = ()
    router_aux: bool = False
    logit_softcap: str | None = None
    logit_softcap_since: tuple[int, int] = (0, 0)
    holes_ignored: str = ""
    pixel_keys: tuple[str, ...] = ()
    labels_in_main_pass_below: tuple[int, int] | None = None
    broken: tuple[tuple[str, str], ...] = ()
    proven: bool = True
    unproven_reason: str = ""


DEEPSTACK = ("visual_pos_masks", "deepstack_visual_embeds")
TIMM = ("its tiny test model needs a TimmWrapper vision tower, i.e. the timm package, which imports "
        "torchvision; PyPI's torchvision does not load beside the CPU torch the default test envs "
        "pin, so CI does not run its cases. `tox -e timm` (torch 2.14.1 + torchvision 0.29.1 + "
        "timm, ~5.5 GB) runs them")
LLAMA4_5_24 = ("transformers 5.24.0's Llama4ForConditionalGeneration.forward always raises "
               "AttributeError ('MoeCausalLMOutputWithPast' object has no attribute "
               "'image_outputs'): training and generate() fail before calplug runs. Use 4.57.6 "
               "or a release with the fix")

_ROWS = [
    # -- Llava types: images [..., 3, H, W], 1-D positions -----------------------------------------
    FamilyFacts("Llava", "llava", "LlavaForConditionalGeneration", (4, 45), pixel_keys=IMAGE_PIXELS),
    FamilyFacts("LlavaNext", "llava_next", "LlavaNextForConditionalGeneration", (4, 45),
                pixel_keys=IMAGE_PIXELS),
    FamilyFacts("LlavaNextVideo", "llava_next_video", "LlavaNextVideoForConditionalGeneration", (4, 45),
                pixel_keys=IMAGE_PIXELS),
    FamilyFacts("LlavaOnevision", "llava_onevision", "LlavaOnevisionForConditionalGeneration", (4, 45),
                pixel_keys=IMAGE_PIXELS),
    FamilyFacts("VipLlava", "vipllava", "VipLlavaForConditionalGeneration", (4, 45),
                pixel_keys=IMAGE_PIXELS),
    FamilyFacts("VideoLlava", "video_llava", "VideoLlavaForConditionalGeneration", (4, 45),
                pixel_keys=IMAGE_PIXELS + ("pixel_values_images",)),
    FamilyFacts("Mistral3", "mistral3", "Mistral3ForConditionalGeneration", (4, 50),
                pixel_keys=("pixel_values",)),
    FamilyFacts("InternVL", "internvl", "InternVLForConditionalGeneration", (4, 52),
                pixel_keys=("pixel_values",)),
    FamilyFacts("AyaVision", "aya_vision", "AyaVisionForConditionalGeneration", (4, 50),
                pixel_keys=("pixel_values",)),
    FamilyFacts("Cohere2Vision", "cohere2_vision", "Cohere2VisionForConditionalGeneration", (4, 55),
                pixel_keys=("pixel_values",)),
    # Idefics-type pixel_values [B, images, 3, H, W]; an all-zero image is padding (blur keeps it so)
    FamilyFacts("Idefics2", "idefics2", "Idefics2ForConditionalGeneration", (4, 45),
                pixel_keys=("pixel_values",)),
    FamilyFacts("Idefics3", "idefics3", "Idefics3ForConditionalGeneration", (4, 46),
                pixel_keys=("pixel_values",)),
    FamilyFacts("SmolVLM", "smolvlm", "SmolVLMForConditionalGeneration", (4, 50),
                pixel_keys=("pixel_values",)),
    FamilyFacts("Aria", "aria", "AriaForConditionalGeneration", (4, 48), pixel_keys=("pixel_values",)),
    FamilyFacts("Ovis2", "ovis2", "Ovis2ForConditionalGeneration", (4, 56), placeholders=IMAGE_ONLY,
                pixel_keys=("pixel_values",)),
    FamilyFacts("Llama4", "llama4", "Llama4ForConditionalGeneration", (4, 51),
                broken=(("5.24.0", LLAMA4_5_24),), pixel_keys=("pixel_values",)),
    FamilyFacts("FastVlm", "fast_vlm", "FastVlmForConditionalGeneration", (5, 0),
                pixel_keys=("pixel_values",), proven=False, unproven_reason=TIMM),
    FamilyFacts("PerceptionLM", "perception_lm", "PerceptionLMForConditionalGeneration", (4, 54),
                pixel_keys=IMAGE_PIXELS, proven=False, unproven_reason=TIMM),
    # -- bidirectional image (or prefix) attention: 4-D / per-layer-type mask dicts --------------
    FamilyFacts("PaliGemma", "paligemma", "PaliGemmaForConditionalGeneration", (4, 45),
                placeholders=IMAGE_ONLY,
                logit_softcap="final_logit_softcapping", logit_softcap_since=(5, 0),
                labels_in_main_pass_below=(5, 0), pixel_keys=("pixel_values",)),
    FamilyFacts("Gemma3", "gemma3", "Gemma3ForConditionalGeneration", (4, 50),
                placeholders=IMAGE_ONLY,
                pixel_keys=("pixel_values",)),
    FamilyFacts("Gemma3n", "gemma3n", "Gemma3nForConditionalGeneration", (4, 53),
                placeholders=IMAGE_ONLY, logit_softcap="final_logit_softcapping",
                pixel_keys=("pixel_values",), proven=False, unproven_reason=TIMM),
    FamilyFacts("Gemma4", "gemma4", "Gemma4ForConditionalGeneration", (5, 5),
                logit_softcap="final_logit_softcapping"),
    FamilyFacts("Molmo2", "molmo2", "Molmo2ForConditionalGeneration", (5, 20),
                placeholders=("image_patch_id",)),
    # -- M-RoPE families: patchified pixels, [3, B, L] positions ----------------------------------
    FamilyFacts("Qwen2-VL", "qwen2_vl", "Qwen2VLForConditionalGeneration", (4, 45), mrope=True),
    FamilyFacts("Qwen2.5-VL", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", (4, 49), mrope=True),
    FamilyFacts("Qwen3-VL", "qwen3_vl", "Qwen3VLForConditionalGeneration", (4, 57), mrope=True,
                visual_extras=DEEPSTACK),
    FamilyFacts("Qwen3-VL-MoE", "qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", (4, 57),
                mrope=True, visual_extras=DEEPSTACK, router_aux=True),
    FamilyFacts("Qwen2.5-Omni-Thinker", "qwen2_5_omni_thinker",
                "Qwen2_5OmniThinkerForConditionalGeneration", (4, 52), mrope=True),
    # GLM-4.1V / 4.5V write video frames with the *image* token: image_token_id marks both.
    FamilyFacts("Glm4v", "glm4v", "Glm4vForConditionalGeneration", (4, 53), mrope=True,
                placeholders=IMAGE_ONLY),
    FamilyFacts("Glm4vMoe", "glm4v_moe", "Glm4vMoeForConditionalGeneration", (4, 56), mrope=True,
                placeholders=IMAGE_ONLY, router_aux=True),
    FamilyFacts("Qwen3.5", "qwen3_5", "Qwen3_5ForConditionalGeneration", (5, 2), mrope=True,
                holes_ignored=HOLES_IGNORED.format(what="Gated DeltaNet linear-attention layers",
                                                   state="recurrent state and short convolution")),
    FamilyFacts("Qwen3.5-MoE", "qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", (5, 2),
                mrope=True, router_aux=True,
                holes_ignored=HOLES_IGNORED.format(what="Gated DeltaNet linear-attention layers",
                                                   state="recurrent state and short convolution")),
    # -- hybrid decoders ---------------------------------------------------------------------------
    FamilyFacts("Lfm2Vl", "lfm2_vl", "Lfm2VlForConditionalGeneration", (4, 57),
                placeholders=IMAGE_ONLY,
                holes_ignored=HOLES_IGNORED.format(what="short-convolution layers",
                                                   state="convolution window")),
]

FAMILIES: dict[str, FamilyFacts] = {row.class_name: row for row in _ROWS}

ENCODER_DECODER = ("an encoder-decoder model: the image is encoded on the encoder side and the text "
                   "decoder cross-attends to it, so there are no image positions in the decoded "
                   "sequence to hide; a contrast would have to run the decoder against an encoder "
                   "output without the image, which calplug does not implement")
VQ_TOKENS = ("images are discrete VQ tokens of the text vocabulary, embedded by the text table and "
             "possibly predicted as targets; calplug cannot tell image inputs from image outputs by "
             "placeholder ids, and a no-image contrast for generated image tokens is undefined")
Q_FORMER = ("the image enters as Q-Former query outputs (num_query_tokens of them) in front of or "
            "spliced into the text; an integration would need the query positions for every "
            "version (BLIP-2 concatenated them before the text without placeholder ids until "
            "image_token_index existed) and a decoder-only language model (BLIP-2 also ships with "
            "T5, an encoder-decoder)")
LOGIT_TRANSFORM = ("its forward transforms the logits after lm_head ({what}); the contrast side's "
                   "target logit must get the same transform, which needs a FamilyFacts row and a "
                   "family case")

REFUSED: dict[str, str] = {
    "ChameleonForConditionalGeneration": "Chameleon: " + VQ_TOKENS,
    "Emu3ForConditionalGeneration": "Emu3: " + VQ_TOKENS,
    "JanusForConditionalGeneration": (
        "Janus: its image-generation path uses VQ image tokens (" + VQ_TOKENS + "); the "
        "understanding path splices SigLIP features at image_token_id and would fit, but one class "
        "serves both and a batch does not say which"),
    "Blip2ForConditionalGeneration": "BLIP-2: " + Q_FORMER,
    "InstructBlipForConditionalGeneration": "InstructBLIP: " + Q_FORMER,
    "InstructBlipVideoForConditionalGeneration": "InstructBLIP-Video: " + Q_FORMER,
    "FuyuForCausalLM": (
        "Fuyu: there is no vision encoder; the image's linear patch embeddings are themselves the "
        "sequence (one position per patch, newline tokens between rows), and older releases "
        "scattered them by index lists instead of placeholder ids. Support would need a documented "
        "contrast for patch positions with its own proof"),
    "GitForCausalLM": ("GIT: image embeddings are prepended inside GitModel (no placeholder ids) and "
                       "the loss is shifted by the number of image tokens"),
    "Granite4VisionForConditionalGeneration": (
        "Granite4Vision: the placeholder embeddings are zeroed and the image enters only through "
        "decoder-layer deepstack features (vision_mask, deepstack_features), and the logits are "
        "divided by logits_scaling; it needs a FamilyFacts row (deepstack extras, logit transform) "
        "and a family case"),
    "NemotronH_Omni_Reasoning_V3": (
        "Nemotron-H Omni: video token pruning removes rows, so the decoder sequence is shorter than "
        "input_ids and placeholder positions do not index it"),
    "DiffusionGemmaForBlockDiffusion": "DiffusionGemma: a block-diffusion model, not causal-LM cross-entropy",
    "PI0ForConditionalGeneration": "PI0: a robot-action flow-matching model (MSE on actions), no token loss",
    "EvollaForProteinText2Text": "Evolla: a protein-text model, no images",
    "Mistral4ForCausalLM": "Mistral4ForCausalLM: a text-only causal LM (no vision inputs)",
    "CohereCompassForConditionalGeneration": "CohereCompass: " + LOGIT_TRANSFORM.format(what="* logit_scale"),
    "GraniteDoclingForConditionalGeneration": "GraniteDocling: " + LOGIT_TRANSFORM.format(what="/ logits_scaling"),
    "HyperCLOVAXVisionV2ForConditionalGeneration": "HyperCLOVAX-Vision-V2: " + LOGIT_TRANSFORM.format(what="* logits_scaling"),
    "Inkling2ForConditionalGeneration": "Inkling2: " + LOGIT_TRANSFORM.format(what="soft-capping"),
    "Inkling2LoopForConditionalGeneration": "Inkling2-Loop: " + LOGIT_TRANSFORM.format(what="soft-capping"),
    "InklingForConditionalGeneration": "Inkling: " + LOGIT_TRANSFORM.format(what="truncation to the unpadded vocabulary"),
    "MistralLarge4ForConditionalGeneration": "MistralLarge4: " + LOGIT_TRANSFORM.format(what="soft-capping"),
    "MuseGlimmerForConditionalGeneration": "MuseGlimmer: " + LOGIT_TRANSFORM.format(what="* output_multiplier, soft-capping"),
    "MuseSparkForConditionalGeneration": "MuseSpark: " + LOGIT_TRANSFORM.format(what="* output_multiplier, soft-capping"),
    "Gemma4UnifiedForConditionalGeneration": "Gemma4Unified: " + LOGIT_TRANSFORM.format(what="soft-capping, as Gemma4"),
}

MATCHED_WARNING = (
    "calplug: {cls} is accepted by the generic placeholder-token integration (image positions = "
    "config.{attr} ids in input_ids), but no family case in calplug's tests proves it{why}. Run "
    "`calplug verify` (or calplug.verify(model, batch)) on your model and one of your batches "
    "before training: it checks that the contrast pass is blind to the image, that faithful mode "
    "equals the two-forward reference and that unit weights give the model's own loss."
)


def placeholder_attribute(config, names=IMAGE_VIDEO) -> str | None:
    """The first of ``names`` that ``config`` sets to a token id, else None."""
    for name in names:
        if isinstance(getattr(config, name, None), int):
            return name
    return None


def _generic_rule(class_name: str, config) -> str | None:
    """Why the generic integration does not accept a class with this config (None: it does)."""
    if not class_name.endswith("ForConditionalGeneration"):
        return (f"{class_name} is not a *ForConditionalGeneration class: the generic integration "
                "handles decoder-only VLMs that splice image features at placeholder ids")
    if config is None:
        return f"{class_name} has no transformers config: the generic integration reads ids from it"
    if getattr(config, "is_encoder_decoder", False):
        return f"{class_name}: " + ENCODER_DECODER
    if placeholder_attribute(config) is None:
        return (f"{class_name}: its config sets no image placeholder id ({' / '.join(IMAGE_VIDEO)}), "
                "so calplug cannot locate image positions in input_ids")
    return None


def generic_refusal(model) -> str | None:
    """None when the generic integration accepts ``model``, otherwise why not (refusals included)."""
    name = type(model).__name__
    if name in REFUSED:
        return REFUSED[name]
    if name in FAMILIES:
        return None
    return _generic_rule(name, getattr(model, "config", None))


def support_status(class_name: str) -> tuple[str, str]:
    """``(status, reason)`` of a transformers class by name: "proven", "refused" or "matched"."""
    facts = FAMILIES.get(class_name)
    if facts is not None:
        if facts.proven:
            return "proven", (f"{facts.family}: family cases hf-{facts.key}-* in calplug's tests "
                              "(tests/cases.py) run every property")
        return "matched", (f"{facts.family}: a FamilyFacts row, but no family case runs here: "
                           f"{facts.unproven_reason}; run `calplug verify`")
    if class_name in REFUSED:
        return "refused", REFUSED[class_name]
    import transformers

    cls = getattr(transformers, class_name, None)
    config_class = getattr(cls, "config_class", None)
    if cls is None or config_class is None:
        return "refused", (f"{class_name} is not a model class of the installed transformers "
                           f"{transformers.__version__}: calplug cannot inspect it")
    try:
        config = config_class()
    except Exception as error:  # defaults that do not build: only the class name can be judged
        if not class_name.endswith("ForConditionalGeneration"):
            return "refused", _generic_rule(class_name, None)
        return "matched", (f"its default config does not build here ({type(error).__name__}), so "
                           "only its name was judged; calplug.enable checks the real config for an "
                           "image placeholder id. No family case proves it: run `calplug verify`")
    why = _generic_rule(class_name, config)
    if why is not None:
        return "refused", why
    return "matched", (f"accepted by the generic placeholder-token integration (image positions = "
                       f"config.{placeholder_attribute(config)}); no family case in calplug's tests "
                       "proves it: run `calplug verify`")
