"""Tiny models of the classes whose forward transforms its logits after the text decoder
(Inkling's muP division and cut vocabulary, the soft-caps of Inkling 2 / Inkling 2 Loop, ...):
each built from a config written for the test, every declared transform set to a value that
shows (not the identity, and logits inside a soft-cap's range: a saturated cap makes every gap
0), with a batch laid out as the model's processor lays it out. Test helpers only; merged into
``_hf_families.FAMILIES``.
"""
from __future__ import annotations

import torch

from _hf_families import (EXTRA1, EXTRA2, EXTRA3, IMAGE, PAD, VEND, VIDEO, VOCAB, VSTART, Family, _model,
                          _text, _vision)
from _hf_shrunk import grid_visual, shrunk
from _skips import module_found

# The text decoder both Inkling generations share in shape: one sliding and one full layer, with
# the short convolutions of their attention layers.
INKLING_TEXT = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                    layer_types=["hybrid_sliding", "hybrid"], num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, swa_num_attention_heads=4,
                    swa_num_key_value_heads=2, swa_head_dim=16, sliding_window_size=64, d_rel=8,
                    rel_extent=64, moe_intermediate_size=32, n_routed_experts=4,
                    num_experts_per_tok=2, max_position_embeddings=512, pad_token_id=PAD)


def scipy_unavailable():
    """Why Inkling's tiny vision tower cannot be built here: with fewer encoder layers than scale
    steps (a tiny tower) its layer plan solves an assignment with scipy."""
    if module_found("scipy"):
        return None
    return ("needs the scipy package: Inkling's vision tower plans its layers with "
            "scipy.optimize.linear_sum_assignment when it has fewer layers than scale steps (the "
            "tiny test tower): pip install scipy")


scipy_unavailable.needs = "scipy"  # what CALPLUG_REQUIRE calls it


def build_inkling(seed=0):
    """Inkling: 4 x 4 pixel patches over 2 frames (a 2-layer "HMLP" tower, one token per patch);
    a dense and a sparse MLP layer. Logits: hidden / logits_mup_width_multiplier (0.5 here, not the
    default 24, whose logits would all be near 0), then the first unpadded_vocab_size (248 of 256)
    columns."""
    text = dict(INKLING_TEXT, intermediate_size=128, mlp_layer_types=["dense", "sparse"],
                n_shared_experts=1, unpadded_vocab_size=VOCAB - 8, logits_mup_width_multiplier=0.5,
                initializer_range=0.1)
    vision = dict(patch_size=4, temporal_patch_size=2, num_hidden_layers=2)
    return _model("InklingForConditionalGeneration", seed, text_config=text, vision_config=vision,
                  audio_config=dict(n_mel_bins=8, mel_vocab_size=16), image_token_id=IMAGE)


def inkling_visual(model, kind, g):
    """Four patches, one placeholder each: ``pixel_values [4, T, p, p, 3]``."""
    v = model.config.vision_config
    p, t = v.patch_size, v.temporal_patch_size
    return torch.tensor([IMAGE] * 4), {"pixel_values": torch.randn(4, t, p, p, 3, generator=g)}


def _inkling2(class_name, **text):
    def build(seed=0):
        """Inkling 2: a ViT with 4-pixel patches merged 2 x 2 into each token; logits soft-capped
        at 3 (the default 30 leaves a tiny model's logits uncapped in effect)."""
        config = dict(INKLING_TEXT, unpadded_vocab_size=VOCAB, final_logit_softcapping=3.0,
                      n_layers_per_attn_res_block=1, initializer_range=0.2, eos_token_id=2,
                      **text)
        vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=4,
                      spatial_merge_size=2, posemb_grid_size=4, projection_hidden_dim=64,
                      text_hidden_size=64)
        return _model(class_name, seed, text_config=config, vision_config=vision,
                      image_token_id=IMAGE)
    return build


def inkling2_visual(model, kind, g):
    """A 2 x 2 grid of language-model tokens: ``pixel_values [4, 2p, 2p, 3]`` in [-1, 1]."""
    v = model.config.vision_config
    side = v.patch_size * v.spatial_merge_size
    pixels = torch.rand(4, side, side, 3, generator=g) * 2 - 1
    return torch.tensor([IMAGE] * 4), {"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, 2, 2]])}


def build_hyperclovax(seed=0):
    """HyperCLOVAX-Vision-V2 shrunk from its default config (a Qwen2.5-VL vision tower): logits *
    logits_scaling (0.5 here, not the default 1.0, so that it shows)."""
    return shrunk("HyperCLOVAXVisionV2ForConditionalGeneration", seed, text=dict(logits_scaling=0.5))


def build_mistral_large4(seed=0):
    """MistralLarge4 shrunk from its default config: multi-head latent attention (rotary width =
    head_dim = qk_rope_head_dim 8; its eager attention repeats key heads to query heads 4 / 4), a
    DeepSeek-style top-k key indexer (its default index_topk, 2048, keeps every key of these short
    sequences), a Pixtral tower. Logits soft-capped at 1 (the default 30 would not touch a tiny
    model's logits, which stay within +-0.6 here)."""
    return shrunk("MistralLarge4ForConditionalGeneration", seed, top=dict(image_token_index=IMAGE),
                  text=dict(qk_head_dim=16, head_dim=8, num_key_value_heads=4, index_head_dim=16,
                            index_n_heads=2, final_logit_softcapping=1.0))


def mistral_large4_visual(model, kind, g):
    """A 56 x 56 image: 4 x 4 Pixtral patches merged 2 x 2, two rows of [IMG] x 2 closed by
    [IMG_BREAK] / [IMG_END] (text tokens), with its ``image_sizes``, as the processor writes."""
    ids = torch.tensor([IMAGE, IMAGE, EXTRA1, IMAGE, IMAGE, EXTRA2])
    return ids, {"pixel_values": torch.randn(1, 3, 56, 56, generator=g), "image_sizes": torch.tensor([[56, 56]])}


def build_gemma4_unified(seed=0):
    """Gemma4Unified: Gemma 4's text decoder (a sliding and a full layer, each with its own head
    width: global_head_dim; bidirectional attention within an image), no vision transformer:
    each 4 x 4 merged patch (2-pixel patches pooled 2 x 2) is normalised, projected and placed.
    Logits soft-capped at 1 (the default leaves them uncapped; they stay within +-0.7 here)."""
    text = _text("gemma4_unified_text", head_dim=16, global_head_dim=16, sliding_window=4,
                 layer_types=["sliding_attention", "full_attention"],
                 use_bidirectional_attention="vision", final_logit_softcapping=1.0)
    del text["model_type"]
    vision = dict(patch_size=2, pooling_kernel_size=2, mm_embed_dim=32, mm_posemb_size=8,
                  output_proj_dims=32)
    return _model("Gemma4UnifiedForConditionalGeneration", seed, text_config=text, vision_config=vision,
                  audio_config=dict(audio_embed_dim=16), image_token_id=IMAGE, video_token_id=VIDEO,
                  boi_token_id=VSTART, eoi_token_id=VEND, audio_token_id=EXTRA3, boa_token_id=EXTRA1,
                  eoa_token_index=EXTRA2)


def gemma4_unified_visual(model, kind, g):
    """A 2 x 2 grid of merged patches ``[1, 4, 3 * 4 * 4]`` with their (x, y) positions: 4 tokens."""
    yy, xx = torch.meshgrid(torch.arange(2), torch.arange(2), indexing="ij")
    positions = torch.stack([xx.flatten(), yy.flatten()], -1).unsqueeze(0)
    side = model.config.vision_config.model_patch_size
    return torch.tensor([VSTART] + [IMAGE] * 4 + [VEND]), {
        "pixel_values": torch.rand(1, 4, 3 * side * side, generator=g), "image_position_ids": positions}


def build_granite4_vision(seed=0):
    """Granite4Vision: a CLIP tower (32 x 32 tiles of 8-pixel patches; width 64, one Q-Former head
    of 64), one anyres grid (32 x 32: a base tile and one grid tile), Window Q-Former downsamplers
    at rate 1/2, deepstack features of vision layer -2 into decoder layer 0 and the 4 spatial
    offset groups into layers 0, 1, 1, 1 (the defaults name layers 12-21 of a 2-layer decoder);
    no dropout in the projector and Q-Former (training-mode forwards are compared). Logits / logits_scaling (0.5 here, not the default 1.0, so that it shows)."""
    text = _text("granite4_vision_text", logits_scaling=0.5)
    del text["model_type"]
    vision = _vision("clip_vision_model", hidden_size=64, num_attention_heads=4, image_size=32, patch_size=8)
    return _model("Granite4VisionForConditionalGeneration", seed, text_config=text, vision_config=vision,
                  image_token_index=IMAGE, image_grid_pinpoints=[[32, 32]], downsample_rate="1/2",
                  deepstack_layer_map=[[-2, 0]], spatial_vision_layer=-1,
                  spatial_target_layers=[0, 1, 1, 1], projector_dropout=0.0,
                  qformer_config=dict(intermediate_size=64, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0))


def granite4_vision_visual(model, kind, g):
    """One 32 x 32 image: ``pixel_values [1, 2 tiles, 3, 32, 32]`` with its ``image_sizes``; its
    packed features (base tile, grid tile, newline) are 10 tokens."""
    return torch.tensor([IMAGE] * 10), {"pixel_values": torch.randn(1, 2, 3, 32, 32, generator=g),
                                        "image_sizes": torch.tensor([[32, 32]])}


def _family(key, class_name, build, visual, drop_only=True, images=False, **extra):
    return key, Family(key, class_name, (5, 0), build, visual, video=False, qwen=False, images=images,
                       drop_only=drop_only, **extra)


TRANSFORMS = dict([
    _family("inkling", "InklingForConditionalGeneration", build_inkling, inkling_visual,
            unavailable=scipy_unavailable),
    _family("inkling2", "Inkling2ForConditionalGeneration", _inkling2("Inkling2ForConditionalGeneration"),
            inkling2_visual),
    _family("inkling2_loop", "Inkling2LoopForConditionalGeneration",
            _inkling2("Inkling2LoopForConditionalGeneration", loop_layer_index_start=1,
                      loop_layer_index_end=2, loop_num_passes=2, loop_gate_rank=8),
            inkling2_visual),
    _family("hyperclovax_vision_v2", "HyperCLOVAXVisionV2ForConditionalGeneration", build_hyperclovax,
            grid_visual(14), drop_only=False),
    _family("mistral_large4", "MistralLarge4ForConditionalGeneration", build_mistral_large4,
            mistral_large4_visual, drop_only=False, images=True),
    _family("gemma4_unified", "Gemma4UnifiedForConditionalGeneration", build_gemma4_unified,
            gemma4_unified_visual, drop_only=False),
    _family("granite4_vision", "Granite4VisionForConditionalGeneration", build_granite4_vision,
            granite4_vision_visual, drop_only=False, images=True),
])
