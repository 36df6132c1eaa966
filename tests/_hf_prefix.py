"""Tiny, seeded models of the image-prefix kind (integrations/prefix.py), their batches and their
reference spec, written from the test's own knowledge of the model, never from calplug's
integration: GIT (``GitForCausalLM``) prepends its image's embeddings inside ``GitModel``; its
logits carry the image's rows in front of the text's (patches + 1 = 5 here, 16 x 16 pixels in
8 x 8 patches) and its own loss reads the rows after them. The reference's second forward is the
model's own without ``pixel_values``: the text alone, the same positions.

Merged into ``_hf_kinds.KINDS``; its cases run every property of tests/test_properties.py that
applies and tests/test_kinds.py's kind tests (verify included).
"""
from __future__ import annotations

import torch

from _hf_families import PAD, VOCAB, tf_version
from _hf_kinds import KindFamily, _model, _pad, _scaled
from calplug.reference import reference_image_free_step, without_arguments

PREFIX = "image-prefix"
GIT_IMAGE = dict(image_size=16, patch_size=8)


def build_git(seed=0):
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  **GIT_IMAGE)
    model = _model("GitForCausalLM", seed, vision_config=vision, vocab_size=VOCAB, hidden_size=64,
                   intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=64, pad_token_id=PAD, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0)
    # a random model's image barely moves its logits; a checkpoint's moves them much more: the
    # image features (after the projection's LayerNorm) and the output projection scaled up
    _scaled(model, ("visual_projection.visual_projection.1.weight",), 8.0)
    _scaled(model, ("output.weight",), 10.0)
    return model


def git_image_rows(model) -> int:
    """The rows GIT's image adds in front of the text: its patches plus the class embedding."""
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + 1


def git_batch(model, padding_side="right", text_only=False, lengths=(10, 8, 9), seed=0):
    """GIT's processor layout: ``[CLS] text [SEP]`` (ids 1 and 2), one image per sample (GIT
    prepends it to every sample: no text-only sample); the first 4 tokens and padding unsupervised."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.cat([torch.tensor([1]), torch.randint(3, 240, (n - 2,), generator=g), torch.tensor([2])])
           for n in lengths]
    input_ids, mask = _pad(ids, PAD, padding_side)
    labels = input_ids.masked_fill(mask == 0, -100)
    labels = torch.where((mask.cumsum(1) <= 4) & (mask == 1), torch.full_like(labels, -100), labels)
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels,
                pixel_values=torch.randn(len(lengths), 3, GIT_IMAGE["image_size"], GIT_IMAGE["image_size"],
                                         generator=g))


def git_with_image(model, batch):
    return torch.ones(batch["input_ids"].shape[0], dtype=torch.bool)


def git_reference(model, batch, alpha, beta, window):
    """The model's own forward (its text rows: after the image's), and its own forward without
    ``pixel_values`` (the text alone)."""
    return reference_image_free_step(model, batch, without_arguments(batch, ("pixel_values", "labels")),
                                     git_with_image(model, batch), alpha, beta, window,
                                     prefix=git_image_rows(model))


def git_unavailable():
    if (4, 49) <= tf_version() < (5, 15):
        return ("transformers 4.49-5.14's GitForCausalLM shifts its labels twice in its own loss (the "
                "flattened labels[:, 1:] go to ForCausalLMLoss, which shifts them again), and calplug "
                "refuses those releases (tests/test_kinds.py checks the refusal); run e.g. `tox -e py`")
    return None


PREFIX_KINDS = {f.name: f for f in (
    KindFamily("git", "GitForCausalLM", "GIT", PREFIX, (4, 45), build_git, git_batch, git_reference,
               git_with_image, lambda m: m.git, lambda m: m.git.image_encoder, text_only=False,
               prefix=git_image_rows, unavailable=git_unavailable),
)}
