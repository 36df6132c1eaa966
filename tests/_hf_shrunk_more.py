"""More placeholder classes of transformers 5.x built from their shrunk default configs
(`_hf_shrunk.shrunk`), each with the batch layout its own splice takes: Qianfan-OCR, GOT-OCR2,
HunYuanVL, Kimi-K2.5, ERNIE-4.5-VL-MoE, HY-V4-VL, Qwen4-Exp, DeepSeek-VL hybrid. Test helpers only; merged into
``_hf_families.FAMILIES``. Where a default has to change beyond sizes, the comment says why: the
structure (layer types, projector, rotary layout) stays the model's own.
"""
from __future__ import annotations

import torch

from _hf_families import EXTRA1, EXTRA2, IMAGE, VEND, VIDEO, VSTART
from _hf_shrunk import MROPE, VISION_SIZES, _family, _shrink, grid_visual, image_visual, shrunk


def _rope(sections):
    """M-RoPE sections for the tiny heads (the defaults' sections fit 128-wide heads)."""
    return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections}


def build_qianfan_ocr(seed=0, drop_path_rate=0.0):
    # drop_path_rate 0: the default (0.1) makes the vision tower's residual blocks stochastic in
    # training mode, so two training forwards of one batch differ (the property tests compare
    # forwards of the model itself); a run with stochastic depth off, as with dropout 0, is
    # deterministic. `calplug verify` turns it off for its checks (tests/test_verify.py keeps the
    # default). 32 x 32 images of 8-pixel patches, 2 x 2 pixel shuffle: 4 tokens an image.
    return shrunk("QianfanOCRForConditionalGeneration", seed,
                  vision=dict(image_size=[32, 32], patch_size=[8, 8], drop_path_rate=drop_path_rate),
                  top=dict(image_seq_length=4))


def build_got_ocr2(seed=0):
    # The vision default initialises at std 1e-10 (a checkpoint fills the weights): the tower's
    # output would not depend on the pixels, so 0.02 here. 64 x 64 images of 8-pixel patches (an
    # 8 x 8 grid; windows of 4), two stride-2 convolutions in the projector: 4 tokens an image.
    return shrunk("GotOcr2ForConditionalGeneration", seed,
                  vision=dict(image_size=64, patch_size=8, mlp_dim=64, output_channels=32,
                              window_size=4, global_attn_indexes=[1], initializer_range=0.02),
                  top=dict(image_seq_length=4))


def build_hunyuan_vl(seed=0):
    # Its M-RoPE has four axes (text, width, height, image index); the default sets no sections
    # (its forward then raises), a checkpoint does. head_dim: the default leaves it None.
    return shrunk("HunYuanVLForConditionalGeneration", seed,
                  text=dict(rope_parameters=_rope([2, 2, 2, 2]), head_dim=16),
                  vision=dict(text_hidden_size=64), top=dict(im_start_id=VSTART, im_end_id=VEND))


def build_kimi_k25(seed=0):
    # DeepSeek-V3 decoder (MLA): rotary width = head_dim = qk_rope_head_dim, as many key/value
    # heads as query heads; the vision position table cut to an 8 x 8 grid.
    return shrunk("Kimi_K25ForConditionalGeneration", seed,
                  text=dict(head_dim=8, num_key_value_heads=4),
                  vision=dict(pos_emb_height=8, pos_emb_width=8), top=dict(projection_hidden_size=32))


def build_ernie4_5_vl_moe(seed=0):
    # moe_intermediate_size is a list (text experts, vision experts); M-RoPE sections for 16-wide
    # heads (height + width, then time)
    return shrunk("Ernie4_5_VLMoeForConditionalGeneration", seed,
                  text=dict(moe_intermediate_size=[32, 32], rope_parameters=_rope([3, 3, 2])))


def build_hyv4vl(seed=0):
    # MLA-style attention with indexed layers: rotary width = head_dim; the indexer keeps the top
    # 8 keys (the default 2048 would keep every key of a tiny batch, and so honour mask holes);
    # hc_mult 2: 4 hyper-connection streams x 64 would be the vocabulary size (the "no
    # vocabulary-sized contrast tensors" property looks for that size); initialisation 0.02
    # (default 0.006, at which the tiny model's gaps barely vary)
    return shrunk("HYV4VLForConditionalGeneration", seed,
                  text=dict(rope_parameters=_rope([2, 1, 1]), head_dim=8, num_key_value_heads=4,
                            index_n_heads=2, index_head_dim=8, index_topk=8, hc_mult=2,
                            initializer_range=0.02))


def build_qwen4_exp(seed=0):
    # Gated linear attention and hyper-connections (2 streams of 64); the default sets no
    # sizes for the full-attention layers' token indexer (its layers then fail to build: a
    # checkpoint sets them) and a 20M-row n-gram embedding (1024 rows here)
    return shrunk("Qwen4ExpForConditionalGeneration", seed, vision=dict(num_position_embeddings=64),
                  text=dict(rope_parameters=dict(MROPE, mrope_interleaved=True),
                            linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                            linear_num_value_heads=4, hc_count=2, hc_lowrank=8, ple_embed_dim=16,
                            ngram_vocab_size_base=1024, split_ngram_parts=4, heads_per_ngram=2,
                            indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16,
                            indexer_budget=8, indexer_compress_ratio=2))


def _sam(sam):
    """A SAM tower config shrunk to a 64 x 64 image of 8-pixel patches (windows of 4, the second
    layer global); initialised at 0.02, not the default 1e-10 at which its output does not depend
    on the pixels (a checkpoint fills the weights)."""
    _shrink(sam, VISION_SIZES)
    for name, value in dict(image_size=64, patch_size=8, mlp_dim=64, output_channels=32,
                            window_size=4, global_attn_indexes=[1], initializer_range=0.02).items():
        setattr(sam, name, value)
    sam._attn_implementation = "eager"
    return sam


def build_deepseek_vl_hybrid(seed=0):
    # SigLIP on 32 x 32 images (4 x 4 patches: 16 tokens) beside a SAM tower on 64 x 64 ones; the
    # SAM default initialises at std 1e-10 (a checkpoint fills it), 0.02 here so that its features
    # depend on the pixels
    import transformers

    sam = _sam(transformers.DeepseekVLHybridForConditionalGeneration.config_class().high_res_vision_config)
    return shrunk("DeepseekVLHybridForConditionalGeneration", seed,
                  vision=dict(image_size=32, patch_size=8), top=dict(high_res_vision_config=sam))


def deepseek_vl_hybrid_visual(model, kind, g):
    """16 placeholders; the image at both resolutions (pixel_values, high_res_pixel_values)."""
    return torch.tensor([IMAGE] * 16), {
        "pixel_values": torch.randn(1, 3, 32, 32, generator=g),
        "high_res_pixel_values": torch.randn(1, 3, 64, 64, generator=g)}


def grid_av(patch: int, count: int = 4, video_count: int = 4, shape=None):
    """Images as `_hf_shrunk.grid_visual` (4 x 4 patches, one frame of patches, ``count``
    placeholders); a video: 2 frames of 4 x 4 patches (``video_grid_thw [[2, 4, 4]]``, pixels
    ``[32, 3 * patch**2]`` or ``[32, *shape]``) and ``video_count`` placeholders inside the
    video start / end ids, as many as the model's video features (its own split)."""
    image = grid_visual(patch, temporal=1, count=count, shape=shape)

    def visual(model, kind, g):
        if kind == "image":
            return image(model, kind, g)
        pixels = torch.randn(32, *(shape or (3 * patch * patch,)), generator=g)
        return torch.tensor([EXTRA1] + [VIDEO] * video_count + [EXTRA2]), {
            "pixel_values_videos": pixels, "video_grid_thw": torch.tensor([[2, 4, 4]])}
    return visual


SHRUNK_MORE = dict([
    _family("qianfan_ocr", "QianfanOCRForConditionalGeneration", build_qianfan_ocr,
            image_visual(4), images=True),
    _family("got_ocr2", "GotOcr2ForConditionalGeneration", build_got_ocr2,
            image_visual(4, size=64), images=True),
    # 4 x 4 patches merged 2 x 2: 2 rows of (2 tokens + a newline) and begin / end features = 8
    _family("hunyuan_vl", "HunYuanVLForConditionalGeneration", build_hunyuan_vl,
            grid_visual(16, temporal=1, count=8)),
    # Kimi-K2.5: 4 tokens a video too (its split counts the merged grid of one frame)
    _family("kimi_k25", "Kimi_K25ForConditionalGeneration", build_kimi_k25,
            grid_av(14, shape=(3, 14, 14)), video=True),
    # ERNIE: a video's 2 frames merge in time (temporal_merge_size 2): 4 tokens
    _family("ernie4_5_vl_moe", "Ernie4_5_VLMoeForConditionalGeneration", build_ernie4_5_vl_moe,
            grid_av(14), video=True),
    # 2 merged rows of (2 tokens + a newline) = 6 a frame; indexed attention: drop only
    _family("hyv4vl", "HYV4VLForConditionalGeneration", build_hyv4vl,
            grid_av(16, count=6, video_count=12), drop_only=True, video=True),
    _family("qwen4_exp", "Qwen4ExpForConditionalGeneration", build_qwen4_exp, grid_visual(16),
            drop_only=True),
    _family("deepseek_vl_hybrid", "DeepseekVLHybridForConditionalGeneration",
            build_deepseek_vl_hybrid, deepseek_vl_hybrid_visual, images=True),
])
