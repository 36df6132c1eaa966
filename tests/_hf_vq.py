"""Tiny models whose image enters as discrete tokens or beside them: Chameleon and Emu3 (a VQ-GAN
turns the image into codes of the text vocabulary, spliced at the ``<image>`` placeholders) and
Janus (SigLIP features at the placeholders for understanding; its VQ generation path has its own
head and is not the training forward). Batches are image understanding: text targets only (ids
below the image vocabulary). Test helpers only; merged into ``_hf_families.FAMILIES``.
"""
from __future__ import annotations

import torch

from _hf_families import IMAGE, PAD, VEND, VOCAB, VSTART, Family, _model, _text, tf_version

CODES = 16                 # VQ codebook entries: image token ids 200 .. 215 of the text vocabulary
FIRST_CODE = 200
EOL = 249                  # Emu3's end-of-row token (<|extra_200|>), written after each row of codes
TEXT_IDS = (3, 190)        # the batch's text ids: below the image vocabulary


def _letters(i: int) -> str:
    return "".join(chr(ord("A") + int(d)) for d in str(i))


# Chameleon names code i "IMGIMG<i with digits as letters>Z"; Emu3 "<|visual token 00000i|>".
CHAMELEON_MAP = {"<image>": IMAGE, **{f"IMGIMG{_letters(i)}Z": FIRST_CODE + i for i in range(CODES)}}
EMU3_MAP = {"<image>": IMAGE, "<|extra_200|>": EOL,
            **{f"<|visual token {i:06d}|>": FIRST_CODE + i for i in range(CODES)}}


def _ids() -> dict:
    """Releases from 4.57 name the placeholder in the config; before, only vocabulary_map does."""
    return {"image_token_id": IMAGE} if tf_version() >= (4, 57) else {}


def build_chameleon(seed=0):
    # a 32 x 32 image -> 4 x 4 codes (3 downsamplings); 32 channels: the VQ-GAN's GroupNorm(32)
    vq = dict(embed_dim=8, num_embeddings=CODES, latent_channels=32, resolution=32, base_channels=32,
              channel_multiplier=[1, 2, 2, 2], num_res_blocks=1)
    return _model("ChameleonForConditionalGeneration", seed, vocab_size=VOCAB, hidden_size=64,
                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vq_config=vq, vocabulary_map=CHAMELEON_MAP, pad_token_id=PAD,
                  **_ids())


def build_emu3(seed=0):
    vq = dict(codebook_size=CODES, embed_dim=8, latent_channels=32, base_channels=32,
              channel_multiplier=[1, 2, 2, 2], num_res_blocks=1, attn_resolutions=[], hidden_size=64,
              num_attention_heads=1, temporal_downsample_factor=1)
    text = _text("emu3_text", attention_dropout=0.0)  # its default 0.1: two forwards must agree
    return _model("Emu3ForConditionalGeneration", seed, vq_config=vq, text_config=text,
                  vocabulary_map=EMU3_MAP, **_ids())


def build_janus(seed=0):
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8, projection_dim=64)
    vq = dict(embed_dim=8, num_embeddings=CODES, latent_channels=32, base_channels=32,
              channel_multiplier=[1, 2], num_res_blocks=1, projection_dim=64,
              image_token_embed_dim=64, num_patches=4)
    return _model("JanusForConditionalGeneration", seed, vision_config=vision, vq_config=vq,
                  text_config=_text("llama"), image_token_id=IMAGE)


def vq_visual(count: int, sizes: bool = False):
    """``count`` placeholders for one 32 x 32 image inside begin / end ids: 16 codes (Chameleon),
    4 rows of 4 codes and an end-of-row token (Emu3: 20), 16 SigLIP patches (Janus)."""
    def visual(model, kind, g):
        pixels = {"pixel_values": torch.randn(1, 3, 32, 32, generator=g)}
        if sizes:
            pixels["image_sizes"] = torch.tensor([[32, 32]])
        return torch.tensor([VSTART] + [IMAGE] * count + [VEND]), pixels
    return visual


def broken_here(class_name: str):
    """() -> the upstream bug calplug.enable names for this class on the installed release, or None."""
    def unavailable():
        import transformers

        from calplug.integrations.families import FAMILIES as ROWS

        for version, reason in ROWS[class_name].broken:
            if transformers.__version__ == version:
                return f"{reason}; calplug.enable refuses it (tests/test_family_support.py checks it)"
        return None
    return unavailable


def _family(key, class_name, since, build, visual, images=False):
    return key, Family(key, class_name, since, build, visual, video=False, qwen=False, images=images,
                       text_ids=TEXT_IDS, unavailable=broken_here(class_name))


VQ = dict([
    _family("chameleon", "ChameleonForConditionalGeneration", (4, 44), build_chameleon, vq_visual(16)),
    _family("emu3", "Emu3ForConditionalGeneration", (4, 48), build_emu3, vq_visual(20, sizes=True)),
    _family("janus", "JanusForConditionalGeneration", (4, 52), build_janus, vq_visual(16), images=True),
])
