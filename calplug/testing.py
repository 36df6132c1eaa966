"""Tiny, seeded models and batches built from configs (tests, demo, bench; no downloads)."""
from __future__ import annotations

import torch

IMAGE_TOKEN = 250


def tiny_llava(seed: int = 0, *, vocab_size: int = 256, hidden_size: int = 64, layers: int = 2,
               image_size: int = 32, patch_size: int = 8, attn_implementation: str = "eager"):
    """A random-init transformers `LlavaForConditionalGeneration` (16 image tokens per image)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    n_image_tokens = (image_size // patch_size) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=image_size, patch_size=patch_size),
        text_config=LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                                intermediate_size=2 * hidden_size, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=2),
        image_token_index=IMAGE_TOKEN if vocab_size > IMAGE_TOKEN else vocab_size - 1,
        image_seq_length=n_image_tokens, vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    return model


def llava_batch(model, *, seed: int = 0, lengths=(12, 9, 10), with_image=(True, True, False),
                prompt=4, padding_side: str = "right"):
    """A batch for `tiny_llava`: per sample [image tokens][prompt][answer], padded.

    Prompt tokens and image positions are labelled -100; answer tokens are supervised.
    Samples with ``with_image`` False are text-only.
    """
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    image_token = cfg.image_token_id if getattr(cfg, "image_token_id", None) is not None else cfg.image_token_index
    n_img = cfg.image_seq_length
    vocab = cfg.text_config.vocab_size
    seqs, labs = [], []
    for n_text, img in zip(lengths, with_image):
        text = torch.randint(3, min(vocab, image_token) - 1, (n_text,), generator=g)
        lab = text.clone()
        lab[:prompt] = -100
        if img:
            ids = torch.cat([text[:1], torch.full((n_img,), image_token), text[1:]])
            lab = torch.cat([lab[:1], torch.full((n_img,), -100), lab[1:]])
        else:
            ids = text
        seqs.append(ids)
        labs.append(lab)
    L = max(s.numel() for s in seqs)
    B = len(seqs)
    input_ids = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, (s, lab) in enumerate(zip(seqs, labs)):
        sl = slice(0, s.numel()) if padding_side == "right" else slice(L - s.numel(), L)
        input_ids[b, sl], labels[b, sl], mask[b, sl] = s, lab, 1
    n_images = sum(bool(x) for x in with_image)
    vc = cfg.vision_config
    pixel_values = torch.randn(n_images, 3, vc.image_size, vc.image_size, generator=g)
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels,
                pixel_values=pixel_values if n_images else None)
