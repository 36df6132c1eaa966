"""Tiny models of the placeholder-token classes transformers 5.x added in numbers (GLM-4.6V,
PaddleOCR-VL, VideoLlama3, Qwen3-Omni's thinker, ...): each built from its class's *default*
config with every size shrunk (`shrunk`), the ids of tests/_hf_families.py set, and a batch whose
placeholders and pixels follow the model's own splice (grid-patch pixels ``[patches, C * t * p *
p]`` with ``image_grid_thw``, or whole images). Test helpers only; merged into
``_hf_families.FAMILIES``. A shrunk default is what a user's checkpoint is, at a smaller size: the
model's own structure, layer types and projector, not a config written for the test.
"""
from __future__ import annotations

import torch

from _hf_families import EXTRA1, EXTRA2, IMAGE, PAD, VEND, VIDEO, VOCAB, VSTART, Family, _eager, build_deepseek_vl

# Sizes set on a sub-config wherever it has the attribute (text / vision).
TEXT_SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                  n_routed_experts=4, num_local_experts=4, moe_num_experts=4, num_experts_per_tok=2,
                  moe_k=2, moe_intermediate_size=32, moe_hidden_size=64, n_shared_experts=1,
                  num_shared_experts=1,
                  shared_expert_intermediate_size=32, first_k_dense_replace=1, n_group=1,
                  topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                  qk_nope_head_dim=8, v_head_dim=16, pad_token_id=PAD, max_position_embeddings=512,
                  num_layers=2, sliding_window=64,
                  # linear-attention (Gated DeltaNet) layers: their defaults are 16 + 32 heads of 128
                  linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                  linear_num_value_heads=4)
VISION_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, depth=2,
                    num_attention_heads=4, num_heads=4, num_key_value_heads=4, head_dim=8,
                    out_hidden_size=64, embed_dim=32, num_layers=2)
AUDIO_SIZES = dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                   d_model=16, output_dim=64, downsample_hidden_size=16, max_source_positions=100,
                   n_window=10, num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                   num_attention_heads=2, out_hidden_size=64)
UNSET_KEPT = ("head_dim", "q_lora_rank", "sliding_window")  # None in the default: leave it None
IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART,
           vision_end_token_id=VEND, image_start_token_id=VSTART, image_end_token_id=VEND,
           video_start_token_id=EXTRA1, video_end_token_id=EXTRA2)
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}


def _shrink(config, sizes: dict) -> None:
    for name, value in sizes.items():
        current = getattr(config, name, "absent")
        if current == "absent" or isinstance(current, (list, dict)):
            continue
        if current is None and name in UNSET_KEPT:
            continue
        setattr(config, name, value)
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and types:
        # one layer of each type the model mixes (its first of each), at least two layers
        keep = sorted({types.index(t) for t in types})
        keep = keep if len(keep) >= 2 else list(range(min(2, len(types))))
        for name in ("layer_types", "mlp_layer_types"):
            values = getattr(config, name, None)
            if isinstance(values, list) and len(values) == len(types):
                setattr(config, name, [values[i] for i in keep])
        config.num_hidden_layers = len(keep)


def shrunk(class_name: str, seed: int = 0, text: dict | None = None, vision: dict | None = None,
           top: dict | None = None):
    """``class_name`` (a transformers class) from its default config, every size of its text,
    vision and audio configs shrunk (`TEXT_SIZES`, `VISION_SIZES`, `AUDIO_SIZES`), then ``text`` / ``vision`` / ``top``
    set on the text config, the vision config and the model's config; eager attention, seeded."""
    import transformers

    cls = getattr(transformers, class_name)
    config = cls.config_class()
    for sub, sizes, extra in (("text_config", TEXT_SIZES, text), ("vision_config", VISION_SIZES, vision),
                              ("audio_config", AUDIO_SIZES, None)):
        part = getattr(config, sub, None)
        if part is not None:
            _shrink(part, sizes)
            for name, value in (extra or {}).items():
                setattr(part, name, value)
    for name, value in {**IDS, **(top or {})}.items():
        setattr(config, name, value)
    return _eager(config, seed, cls)


def grid_visual(patch: int, temporal: int = 2, merge: int = 2, block: bool = True, count=None,
                shape=None):
    """A 4 x 4 patch grid per image: ``image_grid_thw [[1, 4, 4]]``, pixels ``[16, 3 * temporal *
    patch**2]`` (or ``[16, *shape]``), ``16 / merge**2`` placeholders (or ``count``), inside
    start / end ids when ``block``."""
    def visual(model, kind, g):
        n = 16 // (merge * merge) if count is None else count
        ids = [IMAGE] * n
        if block:
            ids = [VSTART] + ids + [VEND]
        pixels = torch.randn(16, *(shape or (3 * temporal * patch * patch,)), generator=g)
        return torch.tensor(ids), {"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, 4, 4]])}
    return visual


def image_visual(n: int, size: int = 32, block: bool = True, sizes: bool = False):
    """``n`` placeholders for one ``size`` x ``size`` image (``image_sizes`` too when ``sizes``)."""
    def visual(model, kind, g):
        ids = [IMAGE] * n
        if block:
            ids = [VSTART] + ids + [VEND]
        pixels = {"pixel_values": torch.randn(1, 3, size, size, generator=g)}
        if sizes:
            pixels["image_sizes"] = torch.tensor([[size, size]])
        return torch.tensor(ids), pixels
    return visual


def minicpm_visual(count: int, patch: int = 16):
    """MiniCPM-V's NaViT packing: an 8 x 8 patch grid per image (or video frame) as a
    ``[1, 3, patch, 64 * patch]`` strip with its ``target_sizes``; ``count`` placeholders per image
    or frame inside start / end ids, marked with the ids the config sets (the processor writes the
    tokenizer's image / video token). A video: 2 frames."""
    def visual(model, kind, g):
        frames = 1 if kind == "image" else 2
        token = IMAGE if kind == "image" else VIDEO
        ids = ([VSTART] + [token] * count + [VEND]) * frames
        strip = torch.randn(1, 3, patch, 64 * patch * frames, generator=g)
        sizes = torch.tensor([[8, 8]] * frames)
        if kind == "image":
            return torch.tensor(ids), {"pixel_values": strip, "target_sizes": sizes}
        return torch.tensor(ids), {"pixel_values_videos": strip, "target_sizes_videos": sizes}
    return visual


def minicpm_finish(model, batch):
    """All images (and all videos) of the batch packed into one strip, as the processor packs them."""
    out = dict(batch)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in out:
            px = out[key]
            out[key] = px.permute(1, 2, 0, 3).reshape(1, px.shape[1], px.shape[2], -1)
    return out


def _minicpm(class_name):
    # the window-attention merger after the first vision layer (the default, 6, is past the tiny tower)
    return lambda seed=0: shrunk(class_name, seed, vision=dict(insert_layer_id=0),
                                 top=dict(insert_layer_id=0))


def tile_visual(model, kind, g):
    """GraniteDocling: one 32 x 32 tile per image, ``image_seq_len`` placeholders (4 here)."""
    n = model.model.image_seq_len
    return torch.tensor([VSTART] + [IMAGE] * n + [VEND]), {"pixel_values": torch.randn(1, 3, 32, 32, generator=g)}


def tile_finish(model, batch):
    """pixel_values [B, tiles, 3, H, W] with pixel_attention_mask [B, tiles] (real tiles), as the
    processor gives them: a text-only sample has one padding tile, masked out. Batches already
    laid out so (merged ones) keep their tiles."""
    px = batch["pixel_values"]
    if px.dim() == 5:
        return batch
    B = batch["input_ids"].shape[0]
    with_image = [b for b in range(B) if bool((batch["input_ids"][b] == IMAGE).any())]
    full = torch.zeros(B, 1, *px.shape[1:])
    full[with_image, 0] = px
    real = torch.zeros(B, 1, dtype=torch.bool)
    real[with_image] = True
    return dict(batch, pixel_values=full, pixel_attention_mask=real)


def video_llama3_finish(model, batch):
    """VideoLlama3 merges each image's patches by its own size: 2 x 2 here."""
    return dict(batch, image_merge_sizes=torch.full((batch["image_grid_thw"].shape[0],), 2))


def _glm(class_name):
    # width 96: the fused gate and up projection (2 x width) stays off the vocabulary size
    return lambda seed=0: shrunk(class_name, seed, vision=dict(image_size=56), text={
        "rope_parameters": dict(MROPE, mrope_section=[4, 2, 2]), "intermediate_size": 96})


def _family(key, class_name, build, visual, *, drop_only=False, finish=None, since=(5, 0),
            images=False, video=False):
    return key, Family(key, class_name, since, build, visual, video=video, qwen=False, images=images,
                       drop_only=drop_only, finish=finish)


SHRUNK = dict([
    _family("glm46v", "Glm46VForConditionalGeneration", _glm("Glm46VForConditionalGeneration"),
            grid_visual(14)),
    _family("glm_ocr", "GlmOcrForConditionalGeneration", _glm("GlmOcrForConditionalGeneration"),
            grid_visual(14)),
    _family("glm5_next", "Glm5NextForConditionalGeneration", lambda seed=0: shrunk(
        "Glm5NextForConditionalGeneration", seed, text={
            "rope_parameters": dict(MROPE), "num_key_value_heads": 4, "qk_rope_head_dim": 0,
            "qk_nope_head_dim": 16, "qk_head_dim": 16, "head_dim": 0, "index_n_heads": 2,
            "index_head_dim": 8, "index_topk": 8, "index_kpool": 2, "linear_head_dim": 16,
            "linear_num_heads": 4, "intermediate_size": 96,
            "hc_mult": 2},  # 4 hyper-connection streams x 64 would be the vocabulary size
        vision=dict(image_size=56)), grid_visual(14), drop_only=True),
    _family("cosmos3_omni", "Cosmos3OmniForConditionalGeneration", lambda seed=0: shrunk(
        "Cosmos3OmniForConditionalGeneration", seed,
        text={"rope_parameters": dict(MROPE, mrope_interleaved=True)},
        vision=dict(num_position_embeddings=64, deepstack_visual_indexes=[0, 1], patch_size=16)),
        grid_visual(16)),
    _family("qwen3_omni_moe_thinker", "Qwen3OmniMoeThinkerForConditionalGeneration", lambda seed=0: shrunk(
        "Qwen3OmniMoeThinkerForConditionalGeneration", seed,
        text={"rope_parameters": dict(MROPE, mrope_interleaved=True)},
        vision=dict(num_position_embeddings=64, deepstack_visual_indexes=[0, 1], patch_size=16)),
        grid_visual(16)),
    _family("paddleocr_vl", "PaddleOCRVLForConditionalGeneration", lambda seed=0: shrunk(
        "PaddleOCRVLForConditionalGeneration", seed, text={"rope_parameters": dict(MROPE)}),
        grid_visual(14, shape=(3, 14, 14))),
    _family("exaone4_5", "Exaone4_5_ForConditionalGeneration",
            lambda seed=0: shrunk("Exaone4_5_ForConditionalGeneration", seed), grid_visual(14)),
    _family("llava_onevision1_5", "LlavaOnevision15ForConditionalGeneration",
            lambda seed=0: shrunk("LlavaOnevision15ForConditionalGeneration", seed),
            grid_visual(14, temporal=1)),
    _family("ovis2_5", "Ovis2_5ForConditionalGeneration",
            # a visual vocabulary of 64 (the default, 65536, is a 4M-parameter embedding table)
            lambda seed=0: shrunk("Ovis2_5ForConditionalGeneration", seed, vision=dict(vocab_size=64)),
            grid_visual(16, temporal=1)),
    _family("video_llama_3", "VideoLlama3ForConditionalGeneration",
            lambda seed=0: shrunk("VideoLlama3ForConditionalGeneration", seed),
            grid_visual(16, temporal=1), finish=video_llama3_finish),
    _family("lfm3_vl", "Lfm3VlForConditionalGeneration",
            lambda seed=0: shrunk("Lfm3VlForConditionalGeneration", seed), grid_visual(16),
            drop_only=True),
    _family("deepseek_vl", "DeepseekVLForConditionalGeneration", build_deepseek_vl,
            image_visual(16), since=(4, 54), images=True),
    # MiniCPM-V: 16x token merging (vision merger + MLP merger) gives 4 tokens an 8 x 8 grid; the
    # OCR model merges 4x (16 tokens). Qwen3.5 hybrid decoder: drop only.
    _family("minicpmv4_6", "MiniCPMV4_6ForConditionalGeneration",
            _minicpm("MiniCPMV4_6ForConditionalGeneration"), minicpm_visual(4), drop_only=True,
            finish=minicpm_finish, video=True),
    _family("minicpmv4_7", "MiniCPMV4_7ForConditionalGeneration",
            _minicpm("MiniCPMV4_7ForConditionalGeneration"), minicpm_visual(4), drop_only=True,
            finish=minicpm_finish, video=True),
    _family("minicpm_ocr", "MiniCPMOcrForConditionalGeneration",
            _minicpm("MiniCPMOcrForConditionalGeneration"), minicpm_visual(16), drop_only=True,
            finish=minicpm_finish, video=True),
    _family("cosmos3_edge", "Cosmos3EdgeForConditionalGeneration",
            lambda seed=0: shrunk("Cosmos3EdgeForConditionalGeneration", seed,
                                  text={"rope_parameters": dict(MROPE, mrope_interleaved=True)}),
            grid_visual(16, temporal=1)),
    # Step3p7: the default leaves sliding_window unset while its layer types include sliding
    # attention; its tower gives 4 tokens for a 112 x 112 image (14-pixel patches, two 2x downsamplings)
    _family("step3p7", "Step3p7ForConditionalGeneration",
            lambda seed=0: shrunk("Step3p7ForConditionalGeneration", seed, text=dict(sliding_window=64)),
            image_visual(4, size=112), images=True),
    # Muse Spark / Glimmer: logits * output_multiplier, then the tanh soft-cap (their rows declare
    # both; the defaults, 0.18 / 0.20 and 20, are kept). The projector takes the 2 x 2 merged
    # tower output (4 x 32 wide).
    *(_family(key, class_name, (lambda name: lambda seed=0: shrunk(
        name, seed, vision=dict(out_hidden_size=128),
        top=dict(out_hidden_size=128, projector_hidden_size=64)))(class_name), grid_visual(14))
      for key, class_name in (("muse_spark", "MuseSparkForConditionalGeneration"),
                              ("muse_glimmer", "MuseGlimmerForConditionalGeneration"))),
    # CohereCompass: M-RoPE per layer type, deepstack; logits * logit_scale (None by default, which
    # is 1: 0.5 here so that the declared transform shows)
    _family("cohere_compass", "CohereCompassForConditionalGeneration", lambda seed=0: shrunk(
        "CohereCompassForConditionalGeneration", seed, text=dict(
            logit_scale=0.5, rope_parameters={"full_attention": dict(MROPE),
                                              "sliding_attention": dict(MROPE)})), grid_visual(16)),
    # GraniteDocling: tiles with a pixel mask, deepstack features, logits / logits_scaling (4 by
    # default); initialisation 0.2 so that its divided logits still give gaps that vary
    _family("granite_docling", "GraniteDoclingForConditionalGeneration", lambda seed=0: shrunk(
        "GraniteDoclingForConditionalGeneration", seed,
        vision=dict(image_size=32, patch_size=8, scale_factor=2, initializer_range=0.2),
        text=dict(initializer_range=0.2), top=dict(initializer_range=0.2)),
        tile_visual, images=True, finish=tile_finish),
    _family("lighton_ocr", "LightOnOcrForConditionalGeneration", lambda seed=0: shrunk(
        "LightOnOcrForConditionalGeneration", seed, vision=dict(image_size=32, patch_size=8)),
        image_visual(4, block=False, sizes=True), images=True),
])


# A class calplug matches without a family case: Unlimited-OCR (no FamilyFacts row; the generic
# placeholder rule accepts it). Its tiny model (SAM and CLIP towers shrunk: a 128 x 128 image
# gives a 2 x 2 grid, a newline token per row and a view separator, 7 tokens) trains and passes
# `calplug verify`; its decoder's reference sliding-attention layers make it drop-only. The
# matched-class tests use it.
MATCHED_CLASS = "UnlimitedOcrForConditionalGeneration"


def build_matched(seed=0):
    from transformers.models.unlimited_ocr import configuration_unlimited_ocr as c

    sam = c.UnlimitedOcrSamVisionConfig(
        hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=128,
        patch_size=16, window_size=4, global_attn_indexes=[1], mlp_dim=64, downsample_channels=[32, 32],
        initializer_range=0.02)  # the default, 1e-10, leaves the tower's output (and the image) at 0
    encoder = c.UnlimitedOcrVisionEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=2, image_size=28, patch_size=14)
    # its eager attention does not repeat key / value heads: as many as query heads
    return shrunk(MATCHED_CLASS, seed, vision=dict(sam_config=sam, encoder_config=encoder),
                  text=dict(num_key_value_heads=4))


MATCHED_VISUAL = image_visual(7, size=128)


# -- Nemotron-H Omni (f3): images and videos both at image_token_id, a hybrid Mamba-2 / attention /
# MoE decoder (drop only; Mamba heads of 16 x state 8, chunks of 8: no inner size is the vocabulary size,
# 256). Radio tower in 8 x 8 patches; the pixel shuffle merges 2 x 2: a 32 x 32
# image (flattened patches with image_grid_hw) or each tubelet of 2 frames of a video
# (pixel_values_videos [videos, tubelets, 2 * 3, 32, 32]) gives 4 tokens. Video pruning is off
# (video_pruning_rate 0.0, the default); test_family_support checks the refusal when it is on.
def build_nemotron_h_omni(seed=0, pruning=0.0):
    return shrunk("NemotronH_Omni_Reasoning_V3", seed,
                  text=dict(mamba_num_heads=6, mamba_head_dim=16, n_groups=1, ssm_state_size=8,
                            chunk_size=8, moe_shared_expert_intermediate_size=32,
                            use_mamba_kernels=False),
                  vision=dict(image_size=32, patch_size=8, max_img_size=64, patch_dim=3 * 8 * 8,
                              video_patch_dim=2 * 3 * 8 * 8),
                  top=dict(vision_hidden_size=32, projector_hidden_size=64, video_token_id=None,
                           video_pruning_rate=pruning))


def nemotron_h_omni_visual(model, kind, g):
    if kind == "image":
        return torch.tensor([IMAGE] * 4), {"pixel_values": torch.randn(16, 3 * 8 * 8, generator=g),
                                           "image_grid_hw": torch.tensor([[4, 4]])}
    return torch.tensor([IMAGE] * 8), {"pixel_values_videos": torch.randn(1, 2, 6, 32, 32, generator=g)}


# images and videos share the image token: one modality a batch (as GLM-4.1V)
SHRUNK["nemotron_h_omni"] = Family("nemotron_h_omni", "NemotronH_Omni_Reasoning_V3", (5, 0),
                                   build_nemotron_h_omni, nemotron_h_omni_visual, video=True, qwen=False,
                                   images=False, drop_only=True, video_kinds=("video", None, None))
