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
    logit_transform:  what the forward does to ``lm_head``'s output to make its logits, as
                      `LogitStep` records (scaling, soft-capping, a cut vocabulary); the contrast
                      side's target logit gets the same (`MainPass.logit_transform`). A transform
                      no row declares is caught by the self-check of the first training step.
    holes_ignored:    why ``mask`` / ``patch_mask`` are refused (layers that ignore mask holes);
                      empty when they are fine.
    pixel_keys:       forward arguments holding images ``[..., 3, H, W]``: pixel contrasts (blur)
                      re-run the vision path on them. Empty: pixels are pre-cut patches, no blur.
    labels_in_main_pass_below: before this release the model builds its attention mask from
                      ``labels`` (PaliGemma's prefix-LM): the main pass then passes them on.
    broken:           ``((version, reason), ...)`` transformers releases whose forward of this class
                      is broken upstream: enable refuses them with the reason.
    broken_below:     ``((release, reason), ...)``: every release before ``release`` is refused with
                      the reason (Fuyu before 4.53 scatters its patches by index lists, not at
                      placeholder ids).
    positions_from:   a decoder submodule whose ``position_ids`` argument is the numbering the
                      decoder makes for itself when handed none (OPT's ``embed_positions``: the
                      running sum of ``attention_mask``). The main pass captures it and the
                      contrast pass gets it explicitly: hiding or removing the image would
                      otherwise renumber every text token after it. Enable refuses a release
                      whose decoder takes no ``position_ids``.
    config_refusals:  ``((attribute, value, reason), ...)``: a model whose config has ``attribute``
                      equal to ``value`` is refused at enable with the reason (BLIP-2 with T5).
    call_refusals:    ``((argument, attribute, reason), ...)``: a training call that carries the
                      forward ``argument`` is refused at the step with the reason (``{value}``: the
                      setting) when the model's ``attribute`` (its config's, where the model has
                      none) is set, not 0 / None: Nemotron-H Omni's video token pruning.
    placeholder_fix:  what to do when the config sets none of ``placeholders`` (the class default
                      leaves it unset; the processor marks image positions with the tokenizer's
                      image token): enable refuses such a model with this text.
    vocabulary_placeholder: the ``config.vocabulary_map`` entry that is the image placeholder, for
                      releases whose config has no placeholder attribute (Chameleon, Emu3 before
                      4.57: ``"<image>"``).
    image_vocabulary: attribute path from the model (or its inner ``.model``) to the ids of its
                      discrete image tokens (VQ codes in the text vocabulary: Chameleon, Emu3). A
                      batch with labels on them trains image generation, which has no "same text
                      without the image": the training step refuses it, naming the labels.
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
    logit_transform: tuple["LogitStep", ...] = ()
    holes_ignored: str = ""
    pixel_keys: tuple[str, ...] = ()
    labels_in_main_pass_below: tuple[int, int] | None = None
    broken: tuple[tuple[str, str], ...] = ()
    broken_below: tuple[tuple[tuple[int, int], str], ...] = ()
    positions_from: str = ""
    config_refusals: tuple[tuple[str, object, str], ...] = ()
    call_refusals: tuple[tuple[str, str, str], ...] = ()
    placeholder_fix: str = ""
    vocabulary_placeholder: str = ""
    image_vocabulary: str = ""
    proven: bool = True
    unproven_reason: str = ""


@dataclasses.dataclass(frozen=True)
class LogitStep:
    """One step of a forward's logit transform after ``lm_head``, read from the config at the
    main pass (`compat.logit_transform`), in this order whatever order the row lists them:
    ``"scale"`` (``x * c``), ``"divide"`` (``x / c``), ``"softcap"`` (``tanh(x / c) * c``),
    ``"vocab"`` (keep the first ``c`` columns). ``attribute`` names ``c`` on the text config
    (``on="text"``) or the model's own config (``on="top"``); a step whose value is unset (None,
    0) is not applied, as the forwards do. ``since``: the first release whose forward applies it."""

    op: str
    attribute: str
    since: tuple[int, int] = (0, 0)
    on: str = "text"


def softcap(attribute: str = "final_logit_softcapping", since: tuple[int, int] = (0, 0)) -> tuple:
    return (LogitStep("softcap", attribute, since),)


DEEPSTACK = ("visual_pos_masks", "deepstack_visual_embeds")
TIMM = ("its tiny test model needs a TimmWrapper vision tower, i.e. the timm package, which imports "
        "torchvision; PyPI's torchvision does not load beside the CPU torch the default test envs "
        "pin, so CI does not run its cases. `tox -e timm` (torch 2.14.1 + torchvision 0.29.1 + "
        "timm, ~5.5 GB) runs them")
LLAMA4_5_24 = ("transformers 5.24.0's Llama4ForConditionalGeneration.forward always raises "
               "AttributeError ('MoeCausalLMOutputWithPast' object has no attribute "
               "'image_outputs'): training and generate() fail before calplug runs. Use 4.57.6 "
               "or a release with the fix")

MINICPM_IDS = ("set model.config.image_token_id and video_token_id to the tokenizer's image and "
               "video token ids (processor.image_token_id, processor.video_token_id), the ids its "
               "processor marks image positions with, as released MiniCPM-V checkpoints do: with "
               "them unset the forward ignores pixel_values and pixel_values_videos")

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
                pixel_keys=("pixel_values",),
                logit_transform=(LogitStep("scale", "logit_scale", since=(5, 25)),)),
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
                logit_transform=softcap(since=(5, 0)),
                labels_in_main_pass_below=(5, 0), pixel_keys=("pixel_values",)),
    FamilyFacts("Gemma3", "gemma3", "Gemma3ForConditionalGeneration", (4, 50),
                placeholders=IMAGE_ONLY,
                pixel_keys=("pixel_values",)),
    FamilyFacts("Gemma3n", "gemma3n", "Gemma3nForConditionalGeneration", (4, 53),
                placeholders=IMAGE_ONLY, logit_transform=softcap(),
                pixel_keys=("pixel_values",), proven=False, unproven_reason=TIMM),
    FamilyFacts("Gemma4", "gemma4", "Gemma4ForConditionalGeneration", (5, 5),
                logit_transform=softcap()),
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
    # -- placeholder classes of 5.x, proven on tiny models shrunk from their default configs
    # (tests/_hf_shrunk.py). `since` (5, 0): the class is not in 4.x; its exact first 5.x release
    # is not pinned by the matrix, and no older release has the class to refuse.
    FamilyFacts("GLM-4.6V", "glm46v", "Glm46VForConditionalGeneration", (5, 0), mrope=True,
                placeholders=IMAGE_ONLY),
    FamilyFacts("GLM-OCR", "glm_ocr", "GlmOcrForConditionalGeneration", (5, 0), mrope=True,
                placeholders=IMAGE_ONLY),
    FamilyFacts("GLM-5-Next", "glm5_next", "Glm5NextForConditionalGeneration", (5, 0), mrope=True,
                placeholders=IMAGE_ONLY, router_aux=True,
                holes_ignored=HOLES_IGNORED.format(
                    what="linear-attention and indexed (top-k key selection) layers",
                    state="recurrent state and key selection")),
    FamilyFacts("Cosmos3-Omni", "cosmos3_omni", "Cosmos3OmniForConditionalGeneration", (5, 0),
                mrope=True, visual_extras=DEEPSTACK),
    FamilyFacts("Cosmos3-Edge", "cosmos3_edge", "Cosmos3EdgeForConditionalGeneration", (5, 0),
                mrope=True),
    FamilyFacts("Qwen3-Omni-Thinker", "qwen3_omni_moe_thinker",
                "Qwen3OmniMoeThinkerForConditionalGeneration", (5, 0), mrope=True,
                visual_extras=DEEPSTACK, router_aux=True),
    FamilyFacts("PaddleOCR-VL", "paddleocr_vl", "PaddleOCRVLForConditionalGeneration", (5, 0),
                mrope=True),
    FamilyFacts("EXAONE-4.5", "exaone4_5", "Exaone4_5_ForConditionalGeneration", (5, 0), mrope=True),
    FamilyFacts("LLaVA-OneVision-1.5", "llava_onevision1_5", "LlavaOnevision15ForConditionalGeneration",
                (5, 0), mrope=True),
    FamilyFacts("Ovis2.5", "ovis2_5", "Ovis2_5ForConditionalGeneration", (5, 0)),
    FamilyFacts("VideoLLaMA3", "video_llama_3", "VideoLlama3ForConditionalGeneration", (5, 0)),
    FamilyFacts("Lfm3Vl", "lfm3_vl", "Lfm3VlForConditionalGeneration", (5, 0),
                holes_ignored=HOLES_IGNORED.format(what="short-convolution layers",
                                                   state="convolution window")),
    FamilyFacts("DeepSeek-VL", "deepseek_vl", "DeepseekVLForConditionalGeneration", (4, 54),
                pixel_keys=("pixel_values",)),
    FamilyFacts("Step3p7", "step3p7", "Step3p7ForConditionalGeneration", (5, 0),
                pixel_keys=("pixel_values",)),
    FamilyFacts("LightOnOCR", "lighton_ocr", "LightOnOcrForConditionalGeneration", (5, 0),
                pixel_keys=("pixel_values",)),
    # MiniCPM-V: the class default leaves image_token_id / video_token_id unset (the forward then
    # ignores the pixels); the processor marks image positions with the tokenizer's image token,
    # and a released checkpoint's config sets the same ids. Qwen3.5 hybrid decoder: drop only.
    *(FamilyFacts(family, key, class_name, (5, 0), placeholder_fix=MINICPM_IDS,
                  holes_ignored=HOLES_IGNORED.format(what="Gated DeltaNet linear-attention layers",
                                                     state="recurrent state and short convolution"))
      for family, key, class_name in (
          ("MiniCPM-V-4.6", "minicpmv4_6", "MiniCPMV4_6ForConditionalGeneration"),
          ("MiniCPM-V-4.7", "minicpmv4_7", "MiniCPMV4_7ForConditionalGeneration"),
          ("MiniCPM-OCR", "minicpm_ocr", "MiniCPMOcrForConditionalGeneration"))),
    FamilyFacts("Qianfan-OCR", "qianfan_ocr", "QianfanOCRForConditionalGeneration", (5, 0),
                placeholders=IMAGE_ONLY, pixel_keys=("pixel_values",)),
    FamilyFacts("GOT-OCR2", "got_ocr2", "GotOcr2ForConditionalGeneration", (4, 49),
                placeholders=IMAGE_ONLY, pixel_keys=("pixel_values",)),
    FamilyFacts("HunYuanVL", "hunyuan_vl", "HunYuanVLForConditionalGeneration", (5, 0),
                placeholders=IMAGE_ONLY),
    FamilyFacts("Kimi-K2.5", "kimi_k25", "Kimi_K25ForConditionalGeneration", (5, 0)),
    FamilyFacts("ERNIE-4.5-VL-MoE", "ernie4_5_vl_moe", "Ernie4_5_VLMoeForConditionalGeneration",
                (5, 0), mrope=True, router_aux=True),
    FamilyFacts("HY-V4-VL", "hyv4vl", "HYV4VLForConditionalGeneration", (5, 0),
                holes_ignored=HOLES_IGNORED.format(what="indexed (top-k key selection) layers",
                                                   state="key selection")),
    FamilyFacts("Qwen4-Exp", "qwen4_exp", "Qwen4ExpForConditionalGeneration", (5, 0), mrope=True,
                router_aux=True,
                holes_ignored=HOLES_IGNORED.format(what="gated linear-attention layers",
                                                   state="recurrent state and short convolution")),
    FamilyFacts("DeepSeek-VL-Hybrid", "deepseek_vl_hybrid", "DeepseekVLHybridForConditionalGeneration",
                (4, 54), placeholders=IMAGE_ONLY, pixel_keys=("pixel_values", "high_res_pixel_values")),
]

# -- Q-Former families with a decoder-only (OPT) language model: the query outputs sit at the
# placeholder ids the processor writes before BOS (tests/_hf_qformer.py) ---------------------------
T5_LM = ("with a T5 language model (use_decoder_only_language_model False) the query outputs enter "
         "T5's encoder and the text decoder cross-attends to them: there are no image positions in "
         "the decoded sequence, so that variant is an encoder-decoder model, for calplug's "
         "encoder-decoder kind, not the placeholder-token integration")
QUERY_IDS = ("set model.config.{attr} to the id of the processor's {what} token, as the updated "
             "Salesforce checkpoints do: with it unset, transformers before 4.50 concatenates the "
             "query outputs in front of the text (no placeholder positions) and later releases "
             "splice them nowhere")


def _qformer(family: str, key: str, class_name: str, attr: str, what: str) -> FamilyFacts:
    return FamilyFacts(family, key, class_name, (4, 45), placeholders=(attr,),
                       pixel_keys=("pixel_values",), positions_from="embed_positions",
                       config_refusals=(("use_decoder_only_language_model", False,
                                         f"{family} {T5_LM}"),),
                       placeholder_fix=QUERY_IDS.format(attr=attr, what=what))


_ROWS += [
    _qformer("BLIP-2", "blip_2", "Blip2ForConditionalGeneration", "image_token_index", "image"),
    _qformer("InstructBLIP", "instructblip", "InstructBlipForConditionalGeneration",
             "image_token_index", "image"),
    _qformer("InstructBLIP-Video", "instructblipvideo", "InstructBlipVideoForConditionalGeneration",
             "video_token_index", "video"),
]

# -- discrete image tokens: the image enters as VQ codes of the text vocabulary at the placeholder
# ids (Chameleon, Emu3; their decoders may embed the spliced ids themselves: the merged sequence is
# read at the first layer), or as SigLIP features (Janus's understanding path; its generation path
# has its own head and is not this forward). Image understanding only: labels on image tokens are
# refused at the step. Their forwards mask the image-token logits (min): the targets are text.
CHAMELEON_4_49 = ("transformers 4.49.0's ChameleonModel.forward indexes inputs_embeds, which is None "
                  "when it is called with input_ids, whenever pixel_values is given (TypeError: "
                  "'NoneType' object is not subscriptable): every image batch fails before calplug "
                  "runs. Use 4.45.2, 4.57.6 or 5.x")
EMU3_4_49 = ("transformers 4.49.0's Emu3ForConditionalGeneration.forward takes labels but never uses "
             "them: it returns no loss, so there is nothing to train. Use 5.x")
EMU3_4_57 = ("transformers 4.57.6's Emu3ForConditionalGeneration.forward takes pixel_values and "
             "image_sizes but never passes them to its model: the image never reaches the text "
             "(training is image-blind, with or without calplug). Use 5.x")
_ROWS += [
    FamilyFacts("Chameleon", "chameleon", "ChameleonForConditionalGeneration", (4, 44),
                placeholders=IMAGE_ONLY, vocabulary_placeholder="<image>",
                image_vocabulary="vocabulary_mapping.image_tokens",
                broken=(("4.49.0", CHAMELEON_4_49),)),
    FamilyFacts("Emu3", "emu3", "Emu3ForConditionalGeneration", (4, 48),
                placeholders=IMAGE_ONLY, vocabulary_placeholder="<image>",
                image_vocabulary="vocabulary_mapping.image_tokens",
                broken=(("4.49.0", EMU3_4_49), ("4.57.6", EMU3_4_57))),
    FamilyFacts("Janus", "janus", "JanusForConditionalGeneration", (4, 52),
                placeholders=IMAGE_ONLY, pixel_keys=("pixel_values",)),
]

# -- Fuyu: no vision tower; each image patch, flattened, goes through one linear layer and the result
# is spliced at the image placeholder ids (one per patch; the processor writes a newline token
# after each row of patches, an ordinary text token). The patch positions are the image positions.
FUYU_INDEX_LISTS = (
    "transformers {version}'s FuyuForCausalLM scatters its patch embeddings by index lists "
    "(image_patches_indices), not at placeholder ids: calplug's placeholder integration cannot locate "
    "them from the config. From 4.53 Fuyu splices them at config.image_token_id, which calplug "
    "supports: use transformers >= 4.53")
_ROWS += [
    FamilyFacts("Fuyu", "fuyu", "FuyuForCausalLM", (4, 45), placeholders=IMAGE_ONLY,
                broken_below=(((4, 53), FUYU_INDEX_LISTS),)),
]

# -- Nemotron-H Omni: images and videos both at image_token_id; a hybrid Mamba-2 / attention / MoE
# decoder (drop only). Its Efficient Video Sampling (config.video_pruning_rate > 0; 0, off, by
# default) removes video rows inside the forward: refused at the step for batches with videos.
NEMOTRON_PRUNING = (
    "video_pruning_rate is {value}: Nemotron-H Omni's video token pruning (Efficient Video Sampling) "
    "removes video rows inside the forward, so its decoder sequence is shorter than input_ids and "
    "labels (the model's own loss fails on such a batch too: its labels cannot be aligned). For "
    "training set model.video_pruning_rate = 0.0 (the forward reads this copy of "
    "config.video_pruning_rate, made at init; set both); image batches are never pruned")
_ROWS += [
    FamilyFacts("Nemotron-H Omni", "nemotron_h_omni", "NemotronH_Omni_Reasoning_V3", (5, 0),
                placeholders=IMAGE_ONLY,
                holes_ignored=HOLES_IGNORED.format(what="Mamba-2 state-space layers",
                                                   state="recurrent state and short convolution"),
                call_refusals=(("pixel_values_videos", "video_pruning_rate", NEMOTRON_PRUNING),)),
]

# -- logit transforms after lm_head, declared (tests/_hf_transforms.py and _hf_shrunk.py build
# their tiny models; the first step's self-check compares each model's own logits with the
# contrast side's) --------------------------------------------------------------------------------
# Inkling's attention layers run short convolutions over their keys and values (and Inkling 2's
# over their queries too): a hole in the mask is zeroed but still inside the convolution window.
INKLING_HOLES = HOLES_IGNORED.format(what="short convolutions inside its attention layers",
                                     state="convolution window")
SCALE, DIVIDE, VOCAB = (lambda a: LogitStep("scale", a)), (lambda a: LogitStep("divide", a)), \
    (lambda a: LogitStep("vocab", a))
_ROWS += [
    FamilyFacts("CohereCompass", "cohere_compass", "CohereCompassForConditionalGeneration", (5, 0),
                mrope=True, visual_extras=DEEPSTACK,
                logit_transform=(SCALE("logit_scale"),)),
    FamilyFacts("GraniteDocling", "granite_docling", "GraniteDoclingForConditionalGeneration",
                (5, 0), logit_transform=(DIVIDE("logits_scaling"),), visual_extras=DEEPSTACK,
                pixel_keys=("pixel_values",)),
    FamilyFacts("Granite4Vision", "granite4_vision", "Granite4VisionForConditionalGeneration",
                (5, 0), logit_transform=(DIVIDE("logits_scaling"),),
                visual_extras=("vision_mask", "deepstack_features"), pixel_keys=("pixel_values",)),
    FamilyFacts("HyperCLOVAX-Vision-V2", "hyperclovax_vision_v2",
                "HyperCLOVAXVisionV2ForConditionalGeneration", (5, 0),
                logit_transform=(SCALE("logits_scaling"),)),
    FamilyFacts("Inkling", "inkling", "InklingForConditionalGeneration", (5, 0),
                logit_transform=(DIVIDE("logits_mup_width_multiplier"), VOCAB("unpadded_vocab_size")),
                holes_ignored=INKLING_HOLES),
    FamilyFacts("Inkling2", "inkling2", "Inkling2ForConditionalGeneration", (5, 0),
                logit_transform=softcap(), holes_ignored=INKLING_HOLES),
    FamilyFacts("Inkling2-Loop", "inkling2_loop", "Inkling2LoopForConditionalGeneration", (5, 0),
                logit_transform=softcap(), holes_ignored=INKLING_HOLES),
    FamilyFacts("MistralLarge4", "mistral_large4", "MistralLarge4ForConditionalGeneration", (5, 0),
                logit_transform=softcap(), pixel_keys=("pixel_values",)),
    FamilyFacts("MuseGlimmer", "muse_glimmer", "MuseGlimmerForConditionalGeneration", (5, 0),
                logit_transform=(SCALE("output_multiplier"),) + softcap()),
    FamilyFacts("MuseSpark", "muse_spark", "MuseSparkForConditionalGeneration", (5, 0),
                logit_transform=(SCALE("output_multiplier"),) + softcap()),
    FamilyFacts("Gemma4Unified", "gemma4_unified", "Gemma4UnifiedForConditionalGeneration", (5, 0),
                logit_transform=softcap()),
]

FAMILIES: dict[str, FamilyFacts] = {row.class_name: row for row in _ROWS}

ENCODER_DECODER = ("an encoder-decoder model: the image is encoded on the encoder side and the text "
                   "decoder cross-attends to it, so there are no image positions in the decoded "
                   "sequence to hide; a contrast would have to run the decoder against an encoder "
                   "output without the image, which calplug does not implement")

REFUSED: dict[str, str] = {
    "DiffusionGemmaForBlockDiffusion": "DiffusionGemma: a block-diffusion model, not causal-LM cross-entropy",
    "PI0ForConditionalGeneration": "PI0: a robot-action flow-matching model (MSE on actions), no token loss",
    "PI05ForConditionalGeneration": "PI0.5: a robot-action flow-matching model (MSE on actions), no token loss",
    "EvollaForProteinText2Text": "Evolla: a protein-text model, no images",
    "Mistral4ForCausalLM": "Mistral4ForCausalLM: a text-only causal LM (no vision inputs)",
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
