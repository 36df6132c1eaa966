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
    qwen: bool                # M-RoPE positions

    def available(self) -> bool:
        import transformers

        return tf_version() >= self.since and hasattr(transformers, self.class_name)


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
        if model.config.model_type.startswith("qwen3_vl"):  # one <start>tokens<end> per temporal patch
            ids = torch.tensor(([VSTART] + [VIDEO] * 4 + [VEND]) * 2)
        else:
            ids = torch.tensor([VSTART] + [VIDEO] * 8 + [VEND])
        return ids, {"pixel_values_videos": torch.randn(32, dim, generator=g), "video_grid_thw": grid}
    return visual


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
}


def make_batch(family: Family, model, kinds=("image", "image", None), lengths=(10, 8, 9), prompt=4,
               padding_side="right", seed=0) -> dict:
    """``kinds[b]`` is "image", "video" or None (text-only). Each sample: 2 prefix tokens, the
    placeholders, then text; the first ``prompt`` text tokens and all placeholders get -100."""
    g = torch.Generator().manual_seed(seed)
    seqs, labs, types = [], [], []
    pixels: dict[str, list] = {}
    for n_text, kind in zip(lengths, kinds):
        text = torch.randint(3, 240, (n_text,), generator=g)
        lab = text.clone()
        lab[:prompt] = -100
        ids, lab_, tt = text, lab, torch.zeros(n_text, dtype=torch.long)
        if kind is not None:
            vis, px = family.visual(model, kind, g)
            for k, v in px.items():
                pixels.setdefault(k, []).append(v)
            code = 1 if kind == "image" else 2
            vt = torch.where((vis == IMAGE) | (vis == VIDEO), code, 0)
            ids = torch.cat([text[:2], vis, text[2:]])
            lab_ = torch.cat([lab[:2], torch.full_like(vis, -100), lab[2:]])
            tt = torch.cat([tt[:2], vt, tt[2:]])
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
    return batch


def visual_positions(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Image and video placeholder positions, read from the config by the test itself."""
    cfg = model.config
    ids = [getattr(cfg, n, None) for n in ("image_token_id", "image_token_index",
                                            "video_token_id", "video_token_index")]
    ids = {int(i) for i in ids if i is not None}
    out = torch.zeros_like(input_ids, dtype=torch.bool)
    for i in ids:
        out |= input_ids == i
    return out


def decoder_and_head(model):
    """The text decoder and lm_head, by the paths each transformers version uses (tests' own copy,
    independent of integrations/compat.py)."""
    inner = model.model if hasattr(model, "model") else None
    language_model = getattr(inner, "language_model", None)
    if language_model is not None and not hasattr(language_model, "lm_head"):
        return inner.language_model, model.lm_head          # >= 4.52
    if hasattr(model, "language_model") and hasattr(model.language_model, "lm_head"):
        return model.language_model.model, model.language_model.lm_head  # Llava types < 4.52
    return model.model, model.lm_head                       # Qwen-VL < 4.52
