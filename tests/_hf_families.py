"""Tiny, seeded transformers VLMs of every family calplug integrates, and batches for them.

Test helpers only (model knowledge the tests need to write their own reference): each family
builds a random-init model from a tiny config and a batch of [prefix][visual placeholders]
[prompt][answer] samples, one of them text-only. Version differences of the *configs* are handled
here; calplug's own version gates live in integrations/compat.py. Llava is calplug's own tiny
model (`calplug.testing.tiny_llava`), the one the demo and the bench build too.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

import torch

IMAGE, VIDEO, VSTART, VEND = 250, 251, 252, 253
VOCAB = 256


def tf_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


@dataclasses.dataclass
class Family:
    name: str
    class_name: str
    since: tuple[int, int]
    build: Callable
    visual: Callable          # (model, kind, generator) -> (placeholder ids [n], pixel kwargs)
    video: bool
    qwen: bool                # Qwen-VL type: M-RoPE positions, pixels as pre-cut patches
    images: bool | None = None  # pixels are images [..., 3, H, W] (blur); default: not qwen
    video_kinds: tuple = ("video", "image", None)   # the video batch's samples
    finish: Callable | None = None     # (model, batch) -> batch: family-specific inputs
    logit_cap: Callable | None = None  # model -> the final logit soft-capping its forward applies
    drop_only: bool = False            # mask holes are not honoured (conv / linear attention)
    unavailable: Callable | None = None  # () -> why this environment cannot run it, or None
    text_ids: tuple = (3, 240)         # range of the batch's random text token ids
    prefix: int = 2                    # text tokens before the placeholders (0: the image first)
    positions: Callable | None = None  # (model, batch) -> [B, L] position ids the model numbers its
                                       # sequence with, where its decoder derives them from the mask
    grad_atol: float = 1e-8            # faithful gradients: absolute slack (Case.grad_atol)

    def __post_init__(self):
        if self.images is None:
            self.images = not self.qwen

    def available(self) -> bool:
        import transformers

        return tf_version() >= self.since and hasattr(transformers, self.class_name)

    @property
    def needs(self) -> str | None:
        """The package `unavailable` checks for (its ``needs`` attribute), as CALPLUG_REQUIRE
        names it; None where `unavailable` reports a release's own bug (nothing to install)."""
        return getattr(self.unavailable, "needs", None)

    def skip_reason(self) -> str | None:
        """Why this family's cases cannot run here (None: they can)."""
        import transformers

        if not self.available():
            return (f"{self.class_name} needs transformers >= {self.since[0]}.{self.since[1]} "
                    f"(installed {transformers.__version__}); run e.g. `tox -e py`")
        return self.unavailable() if self.unavailable is not None else None


def _llama(**extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, **extra)


def _clip():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, image_size=32, patch_size=8)


def _finish(cls, config, seed):
    config._attn_implementation = "eager"
    for sub in ("text_config", "vision_config"):
        if getattr(config, sub, None) is not None:
            getattr(config, sub)._attn_implementation = "eager"
    torch.manual_seed(seed)
    return cls(config)


# -- Llava types ---------------------------------------------------------------------------------
LLAVA_COUNTS = {"llava": {"image": 16}, "llava_next": {"image": 36},
                "llava_next_video": {"image": 136, "video": 32},
                "llava_onevision": {"image": 36, "video": 9}}


def build_llava(seed=0):
    from calplug.testing import tiny_llava

    return tiny_llava(seed, vocab_size=VOCAB, image_token=IMAGE)


def build_llava_next(seed=0):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    config = LlavaNextConfig(vision_config=_clip(), text_config=_llama(), image_token_index=IMAGE,
                             image_seq_length=36, vision_feature_layer=-2,
                             vision_feature_select_strategy="default",
                             image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]])
    return _finish(LlavaNextForConditionalGeneration, config, seed)


def build_llava_next_video(seed=0):
    """Patch size 4 (8 x 8 patches a frame): 4.45's video pooler divides by
    ``image_size // patch_size**2``, which the other families' patch size 8 makes 0. Explicit
    ``image_seq_length`` / ``video_seq_length`` keep 4.45 off its legacy one-placeholder path."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    clip = _clip()
    clip.patch_size = 4
    config = LlavaNextVideoConfig(vision_config=clip, text_config=_llama(), image_token_index=IMAGE,
                                  video_token_index=VIDEO, vision_feature_layer=-2,
                                  vision_feature_select_strategy="default",
                                  image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]],
                                  spatial_pool_stride=2, image_seq_length=136, video_seq_length=32)
    return _finish(LlavaNextVideoForConditionalGeneration, config, seed)


def build_llava_onevision(seed=0):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    config = LlavaOnevisionConfig(vision_config=_clip(), text_config=_llama(), image_token_index=IMAGE,
                                  video_token_index=VIDEO, vision_feature_layer=-2,
                                  vision_feature_select_strategy="default",
                                  image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]])
    return _finish(LlavaOnevisionForConditionalGeneration, config, seed)


def llava_visual(family):
    def visual(model, kind, g):
        n = LLAVA_COUNTS[family][kind]
        if kind == "image":
            if family == "llava":
                return torch.full((n,), IMAGE), {"pixel_values": torch.randn(1, 3, 32, 32, generator=g)}
            return torch.full((n,), IMAGE), {"pixel_values": torch.randn(1, 2, 3, 32, 32, generator=g),
                                             "image_sizes": torch.tensor([[32, 32]])}
        return torch.full((n,), VIDEO), {"pixel_values_videos": torch.randn(1, 2, 3, 32, 32, generator=g)}
    return visual


# -- Qwen-VL types -------------------------------------------------------------------------------
def _qwen_config(config_cls, vision, text_extra, seed_cls, seed):
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, **text_extra)
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART,
               vision_end_token_id=VEND)
    if tf_version() >= (4, 57):
        config = config_cls(vision_config=vision, text_config=text, **ids)
    else:
        config = config_cls(vision_config=vision, **text, **ids)
    return _finish(seed_cls, config, seed)


MROPE = {"type": "mrope", "mrope_section": [2, 3, 3]}


def build_qwen2_vl(seed=0):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    return _qwen_config(Qwen2VLConfig, vision, {"rope_scaling": dict(MROPE)},
                        Qwen2VLForConditionalGeneration, seed)


def build_qwen2_5_vl(seed=0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                  patch_size=14, window_size=56, fullatt_block_indexes=[1])
    return _qwen_config(Qwen2_5_VLConfig, vision, {"rope_scaling": dict(MROPE)},
                        Qwen2_5_VLForConditionalGeneration, seed)


def build_qwen3_vl(seed=0):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                  patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    return _qwen_config(Qwen3VLConfig, vision, {"head_dim": 16, "rope_scaling": rope},
                        Qwen3VLForConditionalGeneration, seed)


def build_qwen3_vl_moe(seed=0, **text_extra):
    """Qwen3-VL-MoE: every decoder layer a 4-expert, top-2 MoE block. Router logits (and so the
    load-balancing aux loss) are off unless asked for, as in the released configs."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                  patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    text = {"head_dim": 16, "rope_scaling": rope, "num_experts": 4, "num_experts_per_tok": 2,
            "moe_intermediate_size": 32, "decoder_sparse_step": 1, **text_extra}
    return _qwen_config(Qwen3VLMoeConfig, vision, text, Qwen3VLMoeForConditionalGeneration, seed)


def qwen_visual(patch):
    dim = 3 * 2 * patch * patch

    def visual(model, kind, g):
        if kind == "image":
            grid = torch.tensor([[1, 4, 4]])
            ids = torch.tensor([VSTART] + [IMAGE] * 4 + [VEND])
            return ids, {"pixel_values": torch.randn(16, dim, generator=g), "image_grid_thw": grid}
        grid = torch.tensor([[2, 4, 4]])  # 4 frames, 2 temporal patches, 4 tokens each
        if model.config.model_type.startswith(("qwen3_vl", "qwen3_5")):  # one <start>tokens<end> per temporal patch
            ids = torch.tensor(([VSTART] + [VIDEO] * 4 + [VEND]) * 2)
        else:
            ids = torch.tensor([VSTART] + [VIDEO] * 8 + [VEND])
        return ids, {"pixel_values_videos": torch.randn(32, dim, generator=g), "video_grid_thw": grid}
    return visual


# -- placeholder-token families of the generic integration (integrations/families.py) -----------
EXTRA1, EXTRA2, EXTRA3 = 254, 255, 249
# The embedding row of pad_token_id is zero-initialised (padding_idx); with tied embeddings its
# logit is then 0 everywhere. Ignored labels take token 0 as their target (the spec), so the pad
# id is kept off 0 for those rows to have gaps at all.
PAD = 248


def _text(model_type: str, **extra) -> dict:
    return {**dict(model_type=model_type, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   pad_token_id=PAD), **extra}


def _vision(model_type: str, **extra) -> dict:
    return {**dict(model_type=model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, image_size=32, patch_size=8), **extra}


def _rope(params: dict) -> dict:
    """Rotary settings under the name this transformers version reads."""
    return {"rope_parameters": params} if tf_version() >= (5, 0) else {"rope_scaling": params}


def _eager(config, seed, cls):
    for name in ("text_config", "vision_config", "perceiver_config", "adapter_config",
                 "audio_config", "qformer_config"):
        sub = getattr(config, name, None)
        if sub is not None and not isinstance(sub, dict):
            sub._attn_implementation = "eager"
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return cls(config)


def _model(class_name: str, seed: int, **config):
    import transformers

    cls = getattr(transformers, class_name)
    return _eager(cls.config_class(**config), seed, cls)


def image_visual(n: int, key: str = "pixel_values", shape=(1, 3, 32, 32), block=None):
    """``n`` image placeholders (inside ``block``'s start/end ids when given), pixels under ``key``."""
    def visual(model, kind, g):
        ids = [IMAGE] * n if block is None else [block[0]] + [IMAGE] * n + [block[1]]
        return torch.tensor(ids), {key: torch.randn(*shape, generator=g)}
    return visual


def build_vipllava(seed=0):
    return _model("VipLlavaForConditionalGeneration", seed, vision_config=_clip(),
                  text_config=_llama(), image_token_index=IMAGE, vision_feature_layers=[-2, -1],
                  image_seq_length=16)


def build_video_llava(seed=0):
    return _model("VideoLlavaForConditionalGeneration", seed, vision_config=_clip(),
                  text_config=_llama(), image_token_index=IMAGE, video_token_index=VIDEO,
                  vision_feature_layer=-2, vision_feature_select_strategy="default",
                  image_seq_length=16, video_seq_length=34)


def video_llava_visual(model, kind, g):
    """Images drop the CLS feature (16 tokens), video frames keep it (2 frames x 17)."""
    if kind == "image":
        return torch.full((16,), IMAGE), {"pixel_values_images": torch.randn(1, 3, 32, 32, generator=g)}
    return torch.full((34,), VIDEO), {"pixel_values_videos": torch.randn(1, 2, 3, 32, 32, generator=g)}


def build_idefics2(seed=0):
    perceiver = dict(model_type="idefics2_perceiver", hidden_size=64, resampler_n_latents=4,
                     resampler_depth=1, resampler_n_heads=2, resampler_head_dim=8,
                     num_key_value_heads=1)
    return _model("Idefics2ForConditionalGeneration", seed, vision_config=_vision("idefics2_vision"),
                  perceiver_config=perceiver, text_config=_text("mistral"), image_token_id=IMAGE)


def build_idefics3(seed=0, class_name="Idefics3ForConditionalGeneration", vision="idefics3_vision"):
    return _model(class_name, seed, vision_config=_vision(vision), text_config=_text("llama"),
                  image_token_id=IMAGE, scale_factor=2)


def build_smolvlm(seed=0):
    return build_idefics3(seed, "SmolVLMForConditionalGeneration", "smolvlm_vision")


def idefics_finish(model, batch):
    """pixel_values [B, images, 3, H, W]: the text-only sample gets an all-zero (padding) image."""
    px = batch["pixel_values"]
    with_image = [b for b in range(batch["input_ids"].shape[0]) if bool((batch["input_ids"][b] == IMAGE).any())]
    full = torch.zeros(batch["input_ids"].shape[0], *px.shape[1:])
    full[with_image] = px
    return dict(batch, pixel_values=full)


def build_internvl(seed=0):
    vision = _vision("internvl_vision", image_size=[32, 32], patch_size=[8, 8])
    return _model("InternVLForConditionalGeneration", seed, vision_config=vision,
                  text_config=_text("qwen2"), image_token_id=IMAGE, downsample_ratio=0.5,
                  vision_feature_layer=-1)


def build_mistral3(seed=0):
    vision = _vision("pixtral", head_dim=8)
    return _model("Mistral3ForConditionalGeneration", seed, vision_config=vision,
                  text_config=_text("mistral", head_dim=16), image_token_index=IMAGE,
                  spatial_merge_size=2, vision_feature_layer=-1)


def mistral3_visual(model, kind, g):
    """Rows of [IMG] x 2 closed by [IMG_BREAK] / [IMG_END] (text tokens), as the processor writes."""
    ids = torch.tensor([IMAGE, IMAGE, EXTRA1, IMAGE, IMAGE, EXTRA2])
    return ids, {"pixel_values": torch.randn(1, 3, 32, 32, generator=g),
                 "image_sizes": torch.tensor([[32, 32]])}


def _cohere2(window):
    return _text("cohere2", sliding_window=window, layer_types=["sliding_attention", "full_attention"])


def build_aya_vision(seed=0, window=64):
    return _model("AyaVisionForConditionalGeneration", seed,
                  vision_config=_vision("siglip_vision_model"), text_config=_cohere2(window),
                  image_token_index=IMAGE, downsample_factor=2,
                  vision_feature_select_strategy="full", vision_feature_layer=-1)


def build_cohere2_vision(seed=0, window=64):
    return _model("Cohere2VisionForConditionalGeneration", seed,
                  vision_config=_vision("siglip_vision_model"), text_config=_cohere2(window),
                  image_token_id=IMAGE, downsample_factor=2, alignment_intermediate_size=64)


def build_paligemma(seed=0, softcap=None):
    text = _text("gemma2" if softcap else "gemma", head_dim=16)
    if softcap:
        text.update(final_logit_softcapping=softcap, sliding_window=64)
    # seed + 1: at seed 0 every supervised row of the tiny model's batch has a gap <= 0, so with
    # alpha = 0 the weights would not vary (the faithful test asks them to)
    return _model("PaliGemmaForConditionalGeneration", seed + 1,
                  vision_config=_vision("siglip_vision_model", projection_dim=64), text_config=text,
                  image_token_index=IMAGE, projection_dim=64, hidden_size=64, vocab_size=VOCAB)


def paligemma_finish(model, batch):
    """token_type_ids: 0 = prefix (image and prompt, attended bidirectionally), 1 = suffix. Padding
    is marked 1: transformers 4.45 unmasks every key whose token type is 0, padding included."""
    suffix = (batch["labels"] != -100) | (batch["attention_mask"] == 0)
    return dict(batch, token_type_ids=suffix.long())


def build_gemma3(seed=0, window=4):
    text = _text("gemma3_text", head_dim=16, sliding_window=window,
                 layer_types=["sliding_attention", "full_attention"])
    model = _model("Gemma3ForConditionalGeneration", seed,
                   vision_config=_vision("siglip_vision_model"), text_config=text,
                   image_token_index=IMAGE, boi_token_index=VSTART, eoi_token_index=VEND,
                   mm_tokens_per_image=4)
    # the projector weight starts at zero (a checkpoint fills it): every image would embed as 0
    with torch.no_grad():
        model.get_parameter(next(n for n, _ in model.named_parameters()
                                 if n.endswith("mm_input_projection_weight"))).normal_(0, 0.1)
    return model


def gemma3_finish(model, batch):
    """token_type_ids 1 at image placeholders: attention is bidirectional inside each image."""
    return dict(batch, token_type_ids=(batch["input_ids"] == IMAGE).long())


def build_llama4(seed=0, chunk=64):
    vision = dict(model_type="llama4_vision_model", hidden_size=32, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
                  vision_output_dim=32, projector_input_dim=32, projector_output_dim=32,
                  pixel_shuffle_ratio=0.5)
    # experts of width 96: their fused gate and up projection (2 x width) stays off the vocabulary
    text = _text("llama4_text", head_dim=16, intermediate_size=96, intermediate_size_mlp=128,
                 num_local_experts=4,
                 num_experts_per_tok=1, interleave_moe_layer_step=2, no_rope_layer_interval=2,
                 attention_chunk_size=chunk)
    return _model("Llama4ForConditionalGeneration", seed, vision_config=vision, text_config=text,
                  image_token_index=IMAGE, boi_token_index=VSTART, eoi_token_index=VEND)


def llama4_unavailable():
    if tf_version() == (5, 24):
        return ("transformers 5.24.0's Llama4ForConditionalGeneration.forward always raises "
                "AttributeError ('MoeCausalLMOutputWithPast' object has no attribute "
                "'image_outputs'), and calplug.enable refuses that release; the hf-4.57 env "
                "(transformers 4.57.6) runs these cases")
    return None


def build_lfm2_vl(seed=0):
    vision = dict(model_type="siglip2_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, patch_size=8, num_patches=16)
    text = _text("lfm2", layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False)
    return _model("Lfm2VlForConditionalGeneration", seed, vision_config=vision, text_config=text,
                  image_token_id=IMAGE, downsample_factor=2, projector_hidden_size=64)


def lfm2_vl_visual(model, kind, g):
    """Siglip2 NaFlex input: [images, patches, 3 * p * p] with each image's patch grid."""
    return torch.tensor([VSTART] + [IMAGE] * 4 + [VEND]), {
        "pixel_values": torch.randn(1, 16, 3 * 8 * 8, generator=g),
        "spatial_shapes": torch.tensor([[4, 4]]),
        "pixel_attention_mask": torch.ones(1, 16, dtype=torch.bool)}


def build_aria(seed=0):
    # experts of width 96: their fused gate and up projection (2 x width) stays off the vocabulary
    text = _text("aria_text", intermediate_size=96, moe_num_experts=4, moe_topk=2,
                 moe_num_shared_experts=1)
    return _model("AriaForConditionalGeneration", seed, vision_config=_vision("idefics3_vision"),
                  text_config=text, image_token_index=IMAGE, projector_patch_to_query_dict={16: 4})


def aria_visual(model, kind, g):
    return torch.tensor([VSTART] + [IMAGE] * 4 + [VEND]), {
        "pixel_values": torch.randn(1, 3, 32, 32, generator=g),
        "pixel_mask": torch.ones(1, 32, 32, dtype=torch.bool)}


def build_ovis2(seed=0):
    vision = _vision("ovis2_vision", vocab_size=64, hidden_stride=2, num_visual_indicator_tokens=5)
    return _model("Ovis2ForConditionalGeneration", seed, vision_config=vision,
                  text_config=_text("qwen2"), image_token_id=IMAGE,
                  visual_indicator_token_ids=[EXTRA1, EXTRA2, VSTART, VEND, EXTRA3],
                  vocab_size=VOCAB, hidden_size=64)


def _patches(patch, grid, temporal=2):
    t, h, w = grid
    return lambda g: torch.randn(t * h * w, 3 * temporal * patch * patch, generator=g)


def build_glm4v(seed=0, moe=False, router_logits=False):
    vision = dict(model_type="glm4v_moe_vision" if moe else "glm4v_vision", depth=2, hidden_size=32,
                  intermediate_size=64, num_heads=4, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, image_size=56)
    rope = {"rope_type": "default", "type": "default",
            "mrope_section": [2, 1, 1] if moe else [4, 2, 2]}
    if moe:
        text = _text("glm4v_moe_text", n_routed_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
                     n_group=1, topk_group=1, output_router_logits=router_logits,
                     router_aux_loss_coef=0.5, **_rope(rope))
    else:  # width 96: the fused gate and up projection (2 x width) stays off the vocabulary size
        text = _text("glm4v_text", intermediate_size=96, **_rope(rope))
    return _model("Glm4vMoeForConditionalGeneration" if moe else "Glm4vForConditionalGeneration",
                  seed, vision_config=vision, text_config=text, image_token_id=IMAGE,
                  video_token_id=VIDEO, image_start_token_id=VSTART, image_end_token_id=VEND,
                  video_start_token_id=EXTRA1, video_end_token_id=EXTRA2)


def build_glm4v_moe(seed=0, router_logits=False):
    return build_glm4v(seed, moe=True, router_logits=router_logits)


def glm4v_visual(model, kind, g):
    """GLM writes every video frame as <image_start> <image> x n <image_end>: the *image* token;
    mm_token_type_ids (2 for video) tells them apart."""
    if kind == "image":
        return torch.tensor([VSTART] + [IMAGE] * 4 + [VEND]), {
            "pixel_values": _patches(14, (1, 4, 4))(g), "image_grid_thw": torch.tensor([[1, 4, 4]])}
    frame = [VSTART] + [IMAGE] * 4 + [VEND]
    return torch.tensor([EXTRA1] + frame + frame + [EXTRA2]), {
        "pixel_values_videos": _patches(14, (2, 4, 4))(g), "video_grid_thw": torch.tensor([[2, 4, 4]])}


def build_qwen3_5(seed=0, moe=False, router_logits=False):
    vision = dict(model_type="qwen3_5_moe_vision" if moe else "qwen3_5_vision", depth=2,
                  hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=64)
    rope = {"rope_type": "default", "rope_theta": 10000, "mrope_section": [2, 1, 1],
            "mrope_interleaved": True}
    # 2 heads: the gated query projection (heads * head_dim * 2) stays off the vocabulary size,
    # which the "no vocabulary-sized contrast tensors" property looks for
    text = _text("qwen3_5_moe_text" if moe else "qwen3_5_text", head_dim=32, num_attention_heads=2,
                 layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=2,
                 linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                 linear_num_value_heads=4, **_rope(rope))
    if moe:
        text.pop("intermediate_size")
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    shared_expert_intermediate_size=32, output_router_logits=router_logits,
                    router_aux_loss_coef=0.5)
    return _model("Qwen3_5MoeForConditionalGeneration" if moe else "Qwen3_5ForConditionalGeneration",
                  seed, vision_config=vision, text_config=text, image_token_id=IMAGE,
                  video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND)


def build_qwen3_5_moe(seed=0, router_logits=False):
    return build_qwen3_5(seed, moe=True, router_logits=router_logits)


def build_qwen2_5_omni_thinker(seed=0):
    vision = dict(model_type="qwen2_5_omni_vision_encoder", depth=2, hidden_size=32,
                  intermediate_size=64, num_heads=4, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, out_hidden_size=64, fullatt_block_indexes=[1])
    audio = dict(model_type="qwen2_5_omni_audio_encoder", num_mel_bins=16, encoder_layers=1,
                 encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16, output_dim=64,
                 max_source_positions=100, n_window=10)
    text = _text("qwen2_5_omni_text", **_rope({"rope_type": "default", "type": "default",
                                                "mrope_section": [2, 3, 3]}))
    return _model("Qwen2_5OmniThinkerForConditionalGeneration", seed, vision_config=vision,
                  audio_config=audio, text_config=text, image_token_index=IMAGE,
                  video_token_index=VIDEO, audio_token_index=EXTRA3, audio_start_token_id=EXTRA1,
                  audio_end_token_id=EXTRA2, vision_start_token_id=VSTART, vision_end_token_id=VEND)


def omni_finish(model, batch):
    if "video_grid_thw" in batch:
        batch["video_second_per_grid"] = torch.ones(batch["video_grid_thw"].shape[0])
    return batch


def build_gemma4(seed=0, window=4):
    text = _text("gemma4_text", head_dim=16, global_head_dim=16, hidden_size_per_layer_input=8,
                 vocab_size_per_layer_input=VOCAB, sliding_window=window,
                 layer_types=["sliding_attention", "full_attention"],
                 use_bidirectional_attention="vision", final_logit_softcapping=30.0)
    vision = dict(model_type="gemma4_vision", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                  patch_size=4, pooling_kernel_size=2, position_embedding_size=64)
    return _model("Gemma4ForConditionalGeneration", seed, text_config=text, vision_config=vision,
                  image_token_id=IMAGE, video_token_id=VIDEO, boi_token_id=VSTART,
                  eoi_token_id=VEND, audio_token_id=EXTRA3, boa_token_id=EXTRA1,
                  eoa_token_index=EXTRA2)


def gemma4_visual(model, kind, g):
    """Patchified pixels [images, 16 patches, 3 * 4 * 4] and their (x, y) patch positions; 2 x 2
    pooling gives 4 tokens."""
    yy, xx = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    pos = torch.stack([xx.flatten(), yy.flatten()], -1).unsqueeze(0)
    return torch.tensor([VSTART] + [IMAGE] * 4 + [VEND]), {
        "pixel_values": torch.rand(1, 16, 3 * 4 * 4, generator=g), "image_position_ids": pos}


def build_molmo2(seed=0):
    """The adapter initialised at std 0.2: at the config's 0.02 its attention pooling and gated
    projector (products of small weights) scale the image features down to ~1e-9, so the pixels
    moved the logits by ~1e-7 and no image-leak check could see anything (0.2: features ~1e-2,
    as the text embeddings; the pixels move the logits by ~0.3)."""
    vision = dict(model_type="molmo2_vision", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                  patch_size=4, num_position_embeddings=16, image_size=[16, 16])
    adapter = dict(model_type="molmo2_adapter", vision_feature_layer=[-1], hidden_size=32,
                   num_attention_heads=4, num_key_value_heads=4, head_dim=8, intermediate_size=64,
                   text_hidden_size=64, initializer_range=0.2)
    return _model("Molmo2ForConditionalGeneration", seed, vision_config=vision,
                  adapter_config=adapter, text_config=_text("molmo2_text", head_dim=16,
                                                            additional_vocab_size=8),
                  image_patch_id=IMAGE, image_start_token_id=VSTART, image_end_token_id=VEND,
                  low_res_image_start_token_id=EXTRA1, frame_start_token_id=EXTRA2,
                  frame_end_token_id=EXTRA3)


def molmo2_visual(model, kind, g):
    """One crop of 4 x 4 patches; 2 x 2 pooling windows (indices fixed up in `molmo2_finish`)."""
    return torch.tensor([VSTART] + [IMAGE] * 4 + [VEND]), {
        "pixel_values": torch.randn(1, 16, 3 * 4 * 4, generator=g),
        "image_grids": torch.tensor([[2, 2, 0, 0]])}


def molmo2_finish(model, batch):
    """image_token_pooling indexes the patches of all crops of the batch, flattened; from 5.25
    (whose forward takes ``image_num_crops``, required for more than one image) each image's
    windows index only its own patches, and the forward adds the offsets."""
    per_image = "image_num_crops" in inspect.signature(model.forward).parameters
    crops = batch["pixel_values"].shape[0]
    windows = []
    for crop in range(crops):
        base = 0 if per_image else crop * 16
        for r in range(2):
            for c in range(2):
                windows.append([base + (2 * r + dr) * 4 + 2 * c + dc for dr in (0, 1) for dc in (0, 1)])
    extra = {"image_num_crops": torch.ones(crops, dtype=torch.long)} if per_image else {}
    return dict(batch, image_token_pooling=torch.tensor(windows), **extra)


def timm_unavailable():
    """Why the TimmWrapper families cannot run here: timm is not installed (a skip naming it, or a
    failure where CALPLUG_REQUIRE names timm: tests/_skips.py). An installed timm that does not
    import (torchvision failing beside this torch) raises: that is a broken install, not a
    missing package."""
    try:
        import timm  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name != "timm":
            raise
        return ("needs the timm package (TimmWrapper vision tower), which is not installed; it "
                "imports torchvision, and PyPI's torchvision does not load beside the CPU torch the "
                "tests pin: install a matching torch + torchvision pair (e.g. torch 2.14.1 + "
                "torchvision 0.29.1) and timm to run these cases (tox -e timm)")
    return None


timm_unavailable.needs = "timm"  # what CALPLUG_REQUIRE calls it


def build_perception_lm(seed=0):
    """timm's test ViT (16 x 16 patches of a 64 x 64 image, CLS dropped): 16 tokens per image or
    frame; pixel_values [B, tiles, 3, H, W]."""
    vision = dict(model_type="timm_wrapper", architecture="test_vit", do_pooling=False,
                  model_args={"embed_dim": 64, "img_size": 64})
    return _model("PerceptionLMForConditionalGeneration", seed, vision_config=vision,
                  text_config=_text("llama"), image_token_id=IMAGE, video_token_id=VIDEO,
                  vision_use_cls_token=True, projector_pooling_ratio=1)


def perception_lm_visual(model, kind, g):
    if kind == "image":
        return torch.full((16,), IMAGE), {"pixel_values": torch.randn(1, 1, 3, 64, 64, generator=g)}
    return torch.full((32,), VIDEO), {"pixel_values_videos": torch.randn(1, 2, 3, 64, 64, generator=g)}


GEMMA3N_IDS = dict(boi_token_id=127, eoi_token_id=128, image_token_id=129, boa_token_id=126,
                   eoa_token_id=192, audio_token_id=193)


def build_gemma3n(seed=0):
    """Vocabulary split in three: text [0, 128), vision [128, 192), audio [192, 256) (text ids of
    the batch stay below 120: Family.text_ids); per-layer inputs;
    soft-capped logits; timm's test ConvNeXt (64 x 64 -> 4 soft tokens) as the vision tower."""
    text = _text("gemma3n_text", head_dim=16, vocab_size_per_layer_input=128,
                 hidden_size_per_layer_input=8, laurel_rank=4, altup_num_inputs=2,
                 num_kv_shared_layers=0, activation_sparsity_pattern=[0.95, 0.0],
                 sliding_window=64, layer_types=["sliding_attention", "full_attention"],
                 final_logit_softcapping=30.0, intermediate_size=[128, 128], pad_token_id=125)
    vision = dict(model_type="gemma3n_vision", architecture="test_convnext", do_pooling=False,
                  model_args={}, hidden_size=64, vocab_size=64, vocab_offset=128)
    audio = dict(model_type="gemma3n_audio", vocab_size=64, vocab_offset=192, input_feat_size=16,
                 hidden_size=32, conf_num_attention_heads=2, conf_num_hidden_layers=1,
                 sscp_conv_channel_size=[8, 8])
    return _model("Gemma3nForConditionalGeneration", seed, text_config=text, vision_config=vision,
                  audio_config=audio, vision_soft_tokens_per_image=4, audio_soft_tokens_per_image=4,
                  **GEMMA3N_IDS)


def gemma3n_visual(model, kind, g):
    ids = [GEMMA3N_IDS["boi_token_id"]] + [GEMMA3N_IDS["image_token_id"]] * 4 + [GEMMA3N_IDS["eoi_token_id"]]
    return torch.tensor(ids), {"pixel_values": torch.randn(1, 3, 64, 64, generator=g)}


def build_fast_vlm(seed=0):
    vision = dict(model_type="timm_wrapper", architecture="test_convnext", do_pooling=False,
                  model_args={}, hidden_size=64, num_features=64)
    return _model("FastVlmForConditionalGeneration", seed, vision_config=vision,
                  text_config=_text("qwen2"), image_token_index=IMAGE)


FAMILIES = {
    "llava": Family("llava", "LlavaForConditionalGeneration", (4, 36), build_llava,
                    llava_visual("llava"), video=False, qwen=False),
    "llava_next": Family("llava_next", "LlavaNextForConditionalGeneration", (4, 39), build_llava_next,
                         llava_visual("llava_next"), video=False, qwen=False),
    "llava_next_video": Family("llava_next_video", "LlavaNextVideoForConditionalGeneration", (4, 42),
                               build_llava_next_video, llava_visual("llava_next_video"), video=True,
                               qwen=False),
    "llava_onevision": Family("llava_onevision", "LlavaOnevisionForConditionalGeneration", (4, 45),
                              build_llava_onevision, llava_visual("llava_onevision"), video=True,
                              qwen=False),
    "qwen2_vl": Family("qwen2_vl", "Qwen2VLForConditionalGeneration", (4, 45), build_qwen2_vl,
                       qwen_visual(14), video=True, qwen=True),
    "qwen2_5_vl": Family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", (4, 49), build_qwen2_5_vl,
                         qwen_visual(14), video=True, qwen=True),
    "qwen3_vl": Family("qwen3_vl", "Qwen3VLForConditionalGeneration", (4, 57), build_qwen3_vl,
                       qwen_visual(16), video=True, qwen=True),
    "qwen3_vl_moe": Family("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", (4, 57),
                           build_qwen3_vl_moe, qwen_visual(16), video=True, qwen=True),
    # -- the generic integration's families -------------------------------------------------------
    "vipllava": Family("vipllava", "VipLlavaForConditionalGeneration", (4, 45), build_vipllava,
                       image_visual(16), video=False, qwen=False),
    "video_llava": Family("video_llava", "VideoLlavaForConditionalGeneration", (4, 45),
                          build_video_llava, video_llava_visual, video=True, qwen=False),
    "idefics2": Family("idefics2", "Idefics2ForConditionalGeneration", (4, 45), build_idefics2,
                       image_visual(4, shape=(1, 1, 3, 32, 32), block=(VSTART, VEND)), video=False,
                       qwen=False, finish=idefics_finish),
    "idefics3": Family("idefics3", "Idefics3ForConditionalGeneration", (4, 46), build_idefics3,
                       image_visual(4, shape=(1, 1, 3, 32, 32), block=(VSTART, VEND)), video=False,
                       qwen=False, finish=idefics_finish),
    "smolvlm": Family("smolvlm", "SmolVLMForConditionalGeneration", (4, 50), build_smolvlm,
                      image_visual(4, shape=(1, 1, 3, 32, 32), block=(VSTART, VEND)), video=False,
                      qwen=False, finish=idefics_finish),
    "internvl": Family("internvl", "InternVLForConditionalGeneration", (4, 52), build_internvl,
                       image_visual(4, block=(VSTART, VEND)), video=False, qwen=False),
    "mistral3": Family("mistral3", "Mistral3ForConditionalGeneration", (4, 50), build_mistral3,
                       mistral3_visual, video=False, qwen=False),
    "aya_vision": Family("aya_vision", "AyaVisionForConditionalGeneration", (4, 50),
                         build_aya_vision, image_visual(4, block=(VSTART, VEND)), video=False,
                         qwen=False),
    "cohere2_vision": Family("cohere2_vision", "Cohere2VisionForConditionalGeneration", (4, 55),
                             build_cohere2_vision, image_visual(4, block=(VSTART, VEND)),
                             video=False, qwen=False),
    "paligemma": Family("paligemma", "PaliGemmaForConditionalGeneration", (4, 45), build_paligemma,
                        image_visual(16), video=False, qwen=False, finish=paligemma_finish),
    "gemma3": Family("gemma3", "Gemma3ForConditionalGeneration", (4, 50), build_gemma3,
                     image_visual(4, block=(VSTART, VEND)), video=False, qwen=False,
                     finish=gemma3_finish),
    "llama4": Family("llama4", "Llama4ForConditionalGeneration", (4, 51), build_llama4,
                     image_visual(4, block=(VSTART, VEND)), video=False, qwen=False,
                     unavailable=llama4_unavailable),
    "lfm2_vl": Family("lfm2_vl", "Lfm2VlForConditionalGeneration", (4, 57), build_lfm2_vl,
                      lfm2_vl_visual, video=False, qwen=False, images=False, drop_only=True),
    "aria": Family("aria", "AriaForConditionalGeneration", (4, 48), build_aria, aria_visual,
                   video=False, qwen=False),
    "ovis2": Family("ovis2", "Ovis2ForConditionalGeneration", (4, 56), build_ovis2,
                    image_visual(4, block=(VSTART, VEND)), video=False, qwen=False),
    "glm4v": Family("glm4v", "Glm4vForConditionalGeneration", (4, 53), build_glm4v, glm4v_visual,
                    video=True, qwen=False, images=False, video_kinds=("video", None, None)),
    "glm4v_moe": Family("glm4v_moe", "Glm4vMoeForConditionalGeneration", (4, 56), build_glm4v_moe,
                        glm4v_visual, video=False, qwen=False, images=False),
    "qwen3_5": Family("qwen3_5", "Qwen3_5ForConditionalGeneration", (5, 2), build_qwen3_5,
                      qwen_visual(16), video=True, qwen=False, images=False, drop_only=True),
    "qwen3_5_moe": Family("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", (5, 2),
                          build_qwen3_5_moe, qwen_visual(16), video=False, qwen=False,
                          images=False, drop_only=True),
    "qwen2_5_omni_thinker": Family("qwen2_5_omni_thinker", "Qwen2_5OmniThinkerForConditionalGeneration",
                                   (4, 52), build_qwen2_5_omni_thinker, qwen_visual(14), video=True,
                                   qwen=False, images=False, finish=omni_finish),
    "gemma4": Family("gemma4", "Gemma4ForConditionalGeneration", (5, 5), build_gemma4,
                     gemma4_visual, video=False, qwen=False, images=False,
                     logit_cap=lambda model: model.config.get_text_config().final_logit_softcapping),
    "molmo2": Family("molmo2", "Molmo2ForConditionalGeneration", (5, 20), build_molmo2,
                     molmo2_visual, video=False, qwen=False, images=False, finish=molmo2_finish),
    "perception_lm": Family("perception_lm", "PerceptionLMForConditionalGeneration", (4, 54),
                            build_perception_lm, perception_lm_visual, video=True, qwen=False,
                            unavailable=timm_unavailable),
    "gemma3n": Family("gemma3n", "Gemma3nForConditionalGeneration", (4, 53), build_gemma3n,
                      gemma3n_visual, video=False, qwen=False, text_ids=(3, 120),
                      unavailable=timm_unavailable,
                      logit_cap=lambda model: model.config.get_text_config().final_logit_softcapping),
    "fast_vlm": Family("fast_vlm", "FastVlmForConditionalGeneration", (5, 0), build_fast_vlm,
                       image_visual(4, shape=(1, 3, 64, 64)), video=False, qwen=False,
                       unavailable=timm_unavailable),
}


def make_batch(family: Family, model, kinds=("image", "image", None), lengths=(10, 8, 9), prompt=4,
               padding_side="right", seed=0) -> dict:
    """``kinds[b]`` is "image", "video" or None (text-only). Each sample: ``family.prefix`` text
    tokens (2), the placeholders, then text; the first ``prompt`` text tokens and all placeholders get -100."""
    g = torch.Generator().manual_seed(seed)
    seqs, labs, types = [], [], []
    pixels: dict[str, list] = {}
    for n_text, kind in zip(lengths, kinds):
        text = torch.randint(*family.text_ids, (n_text,), generator=g)
        lab = text.clone()
        lab[:prompt] = -100
        ids, lab_, tt = text, lab, torch.zeros(n_text, dtype=torch.long)
        if kind is not None:
            vis, px = family.visual(model, kind, g)
            for k, v in px.items():
                pixels.setdefault(k, []).append(v)
            code = 1 if kind == "image" else 2
            vt = torch.where((vis == IMAGE) | (vis == VIDEO), code, 0)
            p = family.prefix
            ids = torch.cat([text[:p], vis, text[p:]])
            lab_ = torch.cat([lab[:p], torch.full_like(vis, -100), lab[p:]])
            tt = torch.cat([tt[:p], vt, tt[p:]])
        seqs.append(ids)
        labs.append(lab_)
        types.append(tt)
    B, L = len(seqs), max(s.numel() for s in seqs)
    input_ids = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    token_types = torch.zeros(B, L, dtype=torch.long)
    for b, (s, lab, tt) in enumerate(zip(seqs, labs, types)):
        sl = slice(0, s.numel()) if padding_side == "right" else slice(L - s.numel(), L)
        input_ids[b, sl], labels[b, sl], mask[b, sl], token_types[b, sl] = s, lab, 1, tt
    batch = dict(input_ids=input_ids, attention_mask=mask, labels=labels)
    batch.update({k: torch.cat(v) for k, v in pixels.items()})
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        batch["mm_token_type_ids"] = token_types
    return batch if family.finish is None else family.finish(model, batch)


def visual_positions(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Image and video placeholder positions, read from the config by the test itself."""
    cfg = model.config
    ids = [getattr(cfg, n, None) for n in ("image_token_id", "image_token_index",
                                            "video_token_id", "video_token_index", "image_patch_id")]
    ids.append((getattr(cfg, "vocabulary_map", None) or {}).get("<image>"))  # Chameleon, Emu3 < 4.57
    ids = {int(i) for i in ids if i is not None}
    out = torch.zeros_like(input_ids, dtype=torch.bool)
    for i in ids:
        out |= input_ids == i
    return out


def decoder_and_head(model):
    """The text decoder and lm_head, by the paths each transformers version uses (tests' own copy,
    independent of integrations/compat.py)."""
    inner = model.model if hasattr(model, "model") else None
    for text in (getattr(inner, "language_model", None), getattr(inner, "text_model", None)):
        if text is not None and not hasattr(text, "lm_head") and hasattr(model, "lm_head"):
            return text, model.lm_head                      # >= 4.52; Idefics / SmolVLM: text_model
    if hasattr(model, "language_model") and hasattr(model.language_model, "lm_head"):
        text = model.language_model.model                   # Llava types < 4.52, Llama4, BLIP-2
        return getattr(text, "decoder", text), model.language_model.lm_head  # OPTModel: its OPTDecoder
    if hasattr(model, "text_model") and hasattr(model.text_model, "lm_head"):
        return model.text_model.model, model.text_model.lm_head  # Emu3 < 4.50
    return model.model, model.lm_head                       # Qwen-VL < 4.52


# -- classes outside the family table: one the generic rule matches, one it refuses --------------
def build_deepseek_vl(seed=0):
    """DeepseekVL (4.54+): Llama text, SigLIP features at image_token_id; no FamilyFacts row, so
    the generic integration accepts it as matched-but-unproven."""
    return _model("DeepseekVLForConditionalGeneration", seed,
                  vision_config=_vision("siglip_vision_model"), text_config=_text("llama"),
                  image_token_id=IMAGE)


def build_fuyu(seed=0):
    text = dict(_text("persimmon"), num_key_value_heads=4)
    return _model("FuyuForCausalLM", seed, text_config=text,
                  image_token_id=IMAGE, image_size=32, patch_size=8,
                  hidden_size=64)  # 4.x embeds the patches to the top-level hidden_size


FUYU_NEWLINE = EXTRA1  # the processor's |NEWLINE| token: an ordinary text token after each patch row


def fuyu_visual(model, kind, g):
    """Fuyu's processor layout of one 16 x 16 image in 8 x 8 patches: a placeholder per patch, a
    newline token after each row; ``pixel_values [1, 4, 3 * 8 * 8]``, the flattened patches its one
    linear layer embeds (spliced at the placeholders from 4.53)."""
    p = model.config.patch_size
    ids = ([IMAGE, IMAGE, FUYU_NEWLINE]) * 2
    patches = torch.randn(1, 4, 3 * p * p, generator=g)
    if "pixel_values" in inspect.signature(model.forward).parameters:
        return torch.tensor(ids), {"pixel_values": patches}
    # before transformers renamed them pixel_values (5.2x): image_patches, [1, patches, d] per image
    return torch.tensor(ids), {"image_patches": patches.unsqueeze(0)}


# Fuyu's cases run from 4.53, the first release that splices its patches at placeholder ids
# (integrations/families.py refuses the earlier ones, which scatter them by index lists).
FAMILIES["fuyu"] = Family("fuyu", "FuyuForCausalLM", (4, 53), build_fuyu, fuyu_visual, video=False,
                          qwen=False, images=False)


# The placeholder classes built from their shrunk default configs (tests/_hf_shrunk.py); imported
# last: it builds on the helpers above.
from _hf_shrunk import SHRUNK  # noqa: E402
from _hf_shrunk_more import SHRUNK_MORE  # noqa: E402
from _hf_qformer import QFORMER  # noqa: E402
from _hf_vq import VQ  # noqa: E402
from _hf_transforms import TRANSFORMS  # noqa: E402

FAMILIES.update(SHRUNK)
FAMILIES.update(SHRUNK_MORE)
FAMILIES.update(QFORMER)
FAMILIES.update(VQ)
FAMILIES.update(TRANSFORMS)
