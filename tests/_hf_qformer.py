"""Tiny BLIP-2, InstructBLIP and InstructBLIP-Video models with an OPT (decoder-only) language
model, and their batches: the Q-Former's query outputs spliced at placeholder ids (``image_token_index``
/ ``video_token_index``), which the processors of these releases write *before* BOS, so every
image sample starts with its image. Test helpers only; merged into ``_hf_families.FAMILIES``.
Their T5 variants are encoder-decoder models (another kind of integration), refused here.
"""
from __future__ import annotations

import torch

from _hf_families import IMAGE, VIDEO, VOCAB, Family, _model, tf_version

QUERIES = 4      # num_query_tokens: placeholders per image (per frame for videos)
FRAMES = 2       # InstructBLIP-Video frames per clip
BOS = 2          # OPT's bos_token_id, written after the image as the processor does


def _parts(kind: str) -> dict:
    vision = dict(model_type=f"{kind}_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
                  initializer_range=0.02)  # InstructBLIP's default 1e-10 makes every image alike
    qformer = dict(model_type=f"{kind}_qformer", vocab_size=VOCAB, hidden_size=32,
                   num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   encoder_hidden_size=32, pad_token_id=0, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0)
    # dropout off (OPT's and the Q-Former's default 0.1): two forwards of a training step must agree.
    # OPT: learned positions numbered from the running sum of attention_mask
    text = dict(model_type="opt", vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                num_attention_heads=4, word_embed_proj_dim=64, bos_token_id=BOS, pad_token_id=1,
                max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, init_std=0.1)
    # initialisation 0.1 (OPT's and the projection's 0.02 leave gaps of ~1e-3 in a tiny model: the
    # faithful weights would hardly vary)
    return dict(vision_config=vision, qformer_config=qformer, text_config=text,
                num_query_tokens=QUERIES, initializer_range=0.1)


def build_blip_2(seed=0, image_token=IMAGE):
    return _model("Blip2ForConditionalGeneration", seed, image_token_index=image_token, **_parts("blip_2"))


def build_instructblip(seed=0):
    return _model("InstructBlipForConditionalGeneration", seed, image_token_index=IMAGE,
                  **_parts("instructblip"))


def build_instructblipvideo(seed=0):
    return _model("InstructBlipVideoForConditionalGeneration", seed, video_token_index=VIDEO,
                  **_parts("instructblipvideo"))


def qformer_visual(instruction: bool, video: bool = False):
    """The query placeholders (``QUERIES`` per image, per frame for a video) then BOS; pixels
    ``[1, 3, 32, 32]`` (``[1, FRAMES, 3, 32, 32]``); InstructBLIP's Q-Former prompt
    (``qformer_input_ids``, one row per image)."""
    def visual(model, kind, g):
        count = QUERIES * (FRAMES if video else 1)
        ids = torch.tensor([VIDEO if video else IMAGE] * count + [BOS])
        shape = (1, FRAMES, 3, 32, 32) if video else (1, 3, 32, 32)
        pixels = {"pixel_values": torch.randn(*shape, generator=g)}
        if instruction:
            pixels["qformer_input_ids"] = torch.randint(3, 240, (1, 5), generator=g)
            pixels["qformer_attention_mask"] = torch.ones(1, 5, dtype=torch.long)
        return ids, pixels
    return visual


def opt_positions_unavailable():
    """OPT's decoder takes position ids from the caller from transformers 4.49 on (the matrix's
    releases); before, the contrast pass could not keep the text's positions."""
    if tf_version() < (4, 49):
        return ("transformers 4.45's OPT decoder takes no position_ids, so a contrast pass cannot "
                "keep the text's positions (OPT numbers them from the running sum of attention_mask) "
                "and calplug.enable refuses it; the hf-4.49, hf-4.57 and py envs run these cases")
    return None


def opt_positions(model, batch) -> torch.Tensor:
    """The position ids OPT numbers a sequence with when handed none: the running sum of
    ``attention_mask``, minus one (padding -1)."""
    mask = batch["attention_mask"]
    return (mask.cumsum(1) * mask - 1).long()


def _family(key, class_name, build, visual):
    return key, Family(key, class_name, (4, 45), build, visual, video=False, qwen=False, images=True,
                       prefix=0, positions=opt_positions, unavailable=opt_positions_unavailable,
                       # OPT's key-projection biases: their gradient is 0 in exact arithmetic
                       # (softmax is shift-invariant), round-off in fp32 (as MGM's in cases.py)
                       grad_atol=1e-7)


QFORMER = dict([
    _family("blip_2", "Blip2ForConditionalGeneration", build_blip_2, qformer_visual(False)),
    _family("instructblip", "InstructBlipForConditionalGeneration", build_instructblip,
            qformer_visual(True)),
    _family("instructblipvideo", "InstructBlipVideoForConditionalGeneration", build_instructblipvideo,
            qformer_visual(True, video=True)),
])
