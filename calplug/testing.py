"""Tiny, seeded models and batches built from configs, for the demo, the bench and the tests.

Random init, no downloads: everything calplug runs without a model hub builds its model here.
"""
from __future__ import annotations

import torch

from .gap import IGNORE_INDEX

IMAGE_TOKEN = 250


def tiny_llava(seed: int = 0, *, vocab_size: int = 256, hidden_size: int = 64, layers: int = 2,
               intermediate_size: int | None = None, heads: int = 4, kv_heads: int = 2,
               image_size: int = 32, patch_size: int = 8, vision_hidden: int = 32,
               vision_layers: int = 2, vision_heads: int = 4, vision_feature_layer: int = -2,
               image_token: int | None = None, max_positions: int | None = None,
               attn_implementation: str = "eager"):
    """A random-init transformers `LlavaForConditionalGeneration` (CLIP tower -> Llama decoder),
    seeded: ``(image_size // patch_size) ** 2`` image tokens per image (16 by default).

    The one tiny-Llava builder of calplug: the demo, the bench (LLaVA-1.5 shaped sizes) and the
    tests all build through it. ``image_token`` defaults to 250 when the vocabulary has it, else
    the last id.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    n_image_tokens = (image_size // patch_size) ** 2
    if image_token is None:
        image_token = IMAGE_TOKEN if vocab_size > IMAGE_TOKEN else vocab_size - 1
    text = dict(vocab_size=vocab_size, hidden_size=hidden_size,
                intermediate_size=intermediate_size or 2 * hidden_size, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads)
    if max_positions is not None:
        text["max_position_embeddings"] = max_positions
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                       num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                                       image_size=image_size, patch_size=patch_size),
        text_config=LlamaConfig(**text),
        image_token_index=image_token, image_seq_length=n_image_tokens,
        vision_feature_layer=vision_feature_layer, vision_feature_select_strategy="default",
    )
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)


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
        lab[:prompt] = IGNORE_INDEX
        if img:
            ids = torch.cat([text[:1], torch.full((n_img,), image_token), text[1:]])
            lab = torch.cat([lab[:1], torch.full((n_img,), IGNORE_INDEX), lab[1:]])
        else:
            ids = text
        seqs.append(ids)
        labs.append(lab)
    L = max(s.numel() for s in seqs)
    B = len(seqs)
    input_ids = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, (s, lab) in enumerate(zip(seqs, labs)):
        sl = slice(0, s.numel()) if padding_side == "right" else slice(L - s.numel(), L)
        input_ids[b, sl], labels[b, sl], mask[b, sl] = s, lab, 1
    n_images = sum(bool(x) for x in with_image)
    vc = cfg.vision_config
    pixel_values = torch.randn(n_images, 3, vc.image_size, vc.image_size, generator=g)
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels,
                pixel_values=pixel_values if n_images else None)


# -- the model `calplug verify --tiny llava` checks itself on --------------------------------------
def tiny_llava_with_batch(seed: int = 0):
    """`tiny_llava(seed)` in train mode and a `llava_batch` for it (two samples with an image,
    one text-only, padded): what `calplug verify --tiny llava` checks itself on."""
    model = tiny_llava(seed).train()
    return model, llava_batch(model, seed=seed)


# -- a processor for the tiny Llava: the audit's tests and the demo's audit world -----------------
# The chat template of `tiny_llava_processor`: "<bos>", then each turn's text with " <image>" where
# an image goes, an assistant turn followed by " <eos>". On the demo's word vocabulary it writes
# exactly the demo's training sequence: <bos> <image> describe : <caption> <eos>.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %} <image>{% elif c['type'] == 'text' %} {{ c['text'] }}{% endif %}"
    "{% endfor %}{% if m['role'] == 'assistant' %} {{ eos_token }}{% endif %}{% endfor %}")


def tiny_llava_processor(words, *, image_size: int = 32, patch_size: int = 8,
                         chat_template: str = TINY_CHAT_TEMPLATE):
    """A transformers `LlavaProcessor` for `tiny_llava`, built offline: a whitespace word-level
    tokenizer over ``words`` (which must hold ``<pad>``, ``<bos>``, ``<eos>``; ``<image>`` is added
    after them unless present, so with ``<image>`` last its id is `tiny_llava`'s default image
    token), a CLIP image processor whose pixels are ``x / 127.5 - 1`` (the demo's), and a chat
    template. Unknown words map to ``<pad>``."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                                eos_token="<eos>", unk_token="<pad>")
    fast.add_tokens(["<image>"], special_tokens=True)
    # Pillow-backed where transformers has that class (5.x without torchvision warns otherwise)
    images = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return transformers.LlavaProcessor(
        image_processor=images(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                               image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=fast, patch_size=patch_size, vision_feature_select_strategy="default",
        image_token="<image>", num_additional_image_tokens=1, chat_template=chat_template)
