"""A tiny Llava (model, tokenizer, processor, chat template) and a tiny image dataset in each
framework's format, written to a folder: what the framework tests train on. No hub, no download.

Why Llava: its processor needs only PIL and numpy (transformers' PIL image processors), so the
framework envs run on the CPU torch without torchvision. (Qwen2-VL's processor always loads a
video processor, which needs torchvision; ms-swift's Qwen2-VL path also imports qwen_vl_utils,
which imports torchvision. Where a test needs a Qwen2-VL model it builds the model alone.)

Everything is saved with ``save_pretrained``, so ``AutoConfig`` / ``AutoTokenizer`` /
``AutoProcessor`` / ``LlavaForConditionalGeneration`` load the folder offline, on transformers
5.6 (LLaMA-Factory), 5.16 (axolotl) and 5.19 (ms-swift) alike.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

IMAGE = 32          # image side in pixels
PATCH = 8           # CLIP patch: (32 / 8) ** 2 = 16 image tokens per image
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220),
          "yellow": (230, 230, 20), "white": (250, 250, 250), "black": (5, 5, 5),
          "purple": (150, 20, 170), "orange": (250, 140, 0)}
QUESTION = "What color is the square?"
TEXT = "\n".join(
    [f"USER: {QUESTION}\nASSISTANT: The square is {c}. A {c} square on a plain background."
     for c in COLORS]
    + ["A chat between a curious user and an artificial intelligence assistant.",
       "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 ? ! . , : ;"]) * 4

# LLaVA-1.5's conversation format; content is a string or a list of typed parts. (Newlines right
# after a block tag are written as expressions: transformers renders with trim_blocks.)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n' }}"
    "{% else %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}</s>{% endif %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer():
    """A byte-level BPE tokenizer trained on `TEXT` (a few hundred entries) with LLaVA's special
    tokens, as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>",
                                   extra_special_tokens={"image_token": "<image>"}
                                   if _supports_extra_special_tokens() else None)
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 512
    return fast


def _supports_extra_special_tokens() -> bool:
    import inspect

    from transformers import PreTrainedTokenizerFast

    try:
        return "extra_special_tokens" in inspect.signature(PreTrainedTokenizerFast.__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def build_model_folder(out: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny Llava to ``out``; returns the folder."""
    import torch
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    try:  # transformers 5: the PIL image processor is its own class
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # pragma: no cover - releases before the split
        from transformers import CLIPImageProcessor as ImageProcessor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    image_processor = ImageProcessor(size={"shortest_edge": IMAGE},
                                     crop_size={"height": IMAGE, "width": IMAGE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=PATCH,
                               vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                               image_token="<image>", num_additional_image_tokens=1)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, image_size=IMAGE, patch_size=PATCH)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, bos_token_id=ids["<s>"],
                       eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=ids["<image>"],
                         image_seq_length=(IMAGE // PATCH) ** 2, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", pad_token_id=ids["<pad>"])
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config.bos_token_id = ids["<s>"]
    model.generation_config.eos_token_id = ids["</s>"]
    model.generation_config.pad_token_id = ids["<pad>"]
    model.save_pretrained(out)
    processor.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_images(out: str | os.PathLike, n: int = 8, size: int = IMAGE) -> list[tuple[str, str]]:
    """``n`` size x size PNGs of a coloured square on another colour; ``[(path, colour)]``."""
    from PIL import Image, ImageDraw

    folder = Path(out) / "images"
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    found = []
    for i in range(n):
        colour = names[i % len(names)]
        img = Image.new("RGB", (size, size), COLORS[names[(i + 3) % len(names)]])
        ImageDraw.Draw(img).rectangle([size // 4, size // 4, 3 * size // 4, 3 * size // 4],
                                      fill=COLORS[colour])
        path = folder / f"{i}.png"
        img.save(path)
        found.append((str(path.resolve()), colour))
    return found


# The multi-process runs' sample order (read sequentially, two per micro-batch, micro-batches
# dealt to two ranks in turn): at step 1 rank 1's micro-batch is text-only, at step 2 both ranks
# mix, at step 3 rank 1 is text-only again. True: a sample with an image.
MIXED = (True, True, False, False, True, False, False, True, True, True, False, False)


def tag_records(images, pattern=None) -> list[dict]:
    """Records with an ``<image>`` tag in the user turn and the image path beside it: the format of
    LLaMA-Factory's sharegpt datasets and of ms-swift's ``messages`` datasets. With ``pattern``
    (one bool per record), the False records are text-only (no tag, no image)."""
    pattern = pattern or (True,) * len(images)
    records = []
    for (path, colour), image in zip(images, pattern):
        records.append({"messages": [{"role": "user", "content": ("<image>" if image else "") + QUESTION},
                                     {"role": "assistant", "content": f"The square is {colour}."}],
                        "images": [path] if image else []})
    return records


def write_llamafactory_data(out: str | os.PathLike, n: int = 8, pattern=None) -> Path:
    """``out/dataset_info.json`` naming dataset ``tiny_mm`` and its records (``pattern``: which
    have an image, `tag_records`); returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(pattern) if pattern else n
    (out / "tiny_mm.json").write_text(json.dumps(tag_records(write_images(out, n), pattern), indent=1))
    info = {"tiny_mm": {"file_name": "tiny_mm.json", "formatting": "sharegpt",
                        "columns": {"messages": "messages", "images": "images"},
                        "tags": {"role_tag": "role", "content_tag": "content",
                                 "user_tag": "user", "assistant_tag": "assistant"}}}
    (out / "dataset_info.json").write_text(json.dumps(info, indent=1))
    return out


def write_swift_data(out: str | os.PathLike, n: int = 8, image: int = IMAGE, pattern=None) -> Path:
    """``out/train.jsonl`` in ms-swift's messages format (``image`` pixels a side; ``pattern``:
    which records have an image, `tag_records`); returns the file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(pattern) if pattern else n
    path = out / "train.jsonl"
    records = tag_records(write_images(out, n, image), pattern)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_axolotl_data(out: str | os.PathLike, n: int = 8, pattern=None) -> Path:
    """``out/train.jsonl`` for axolotl's multimodal ``chat_template`` datasets (typed content
    parts, the image by path; ``pattern``: which records have an image); returns the file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(pattern) if pattern else n
    pattern = pattern or (True,) * n
    rows = [{"messages": [
        {"role": "user", "content": ([{"type": "image", "path": path}] if image else [])
         + [{"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": f"The square is {colour}."}]}]}
        for (path, colour), image in zip(write_images(out, n), pattern)]
    path = out / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- Qwen2-VL (needs torchvision: its processor always has a video processor) ---------------------
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                "<|image_pad|>", "<|video_pad|>"]
QWEN_FIRST_SPECIAL_ID = 151643  # <|endoftext|>; <|image_pad|> = 151655, as in the released models
QWEN_PIXELS = 56 * 56           # one 56 x 56 image: 4 x 4 patches of 14, merged 2 x 2: 4 tokens
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen2_vl_folder(out: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny Qwen2-VL whose special tokens have Qwen's real ids: ms-swift's Qwen2-VL template
    writes ``image_token_id = 151655`` into its code, and with other ids it expands no
    placeholder. The vocabulary is padded with entries no merge produces (151,680 rows)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator([TEXT], trainer=trainers.BpeTrainer(
        vocab_size=400, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), QWEN_FIRST_SPECIAL_ID):
        vocab[f"<filler_{i}>"] = i
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens(QWEN_SPECIAL)
    fast = Qwen2Tokenizer(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = QWEN_CHAT_TEMPLATE
    ids = {t: fast.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    assert ids["<|image_pad|>"] == 151655, ids
    size = {"shortest_edge": QWEN_PIXELS, "longest_edge": QWEN_PIXELS}
    common = dict(size=size, patch_size=14, temporal_patch_size=2, merge_size=2)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**common), tokenizer=fast,
                                 video_processor=Qwen2VLVideoProcessor(**common),
                                 chat_template=QWEN_CHAT_TEMPLATE)
    vocab_size = (len(fast) + 63) // 64 * 64
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rope_theta=10000.0,
                tie_word_embeddings=False, eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_chans=3)
    config = Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"],
                           vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
                           eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    processor.save_pretrained(out)
    fast.save_pretrained(out)
    return out
