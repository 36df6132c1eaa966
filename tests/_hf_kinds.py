"""Tiny, seeded transformers VLMs of the kinds whose image is not spliced at placeholder ids of the
text decoder's sequence, their batches, and each one's reference spec, written from the test's
own knowledge of the model (module paths, token ids, which arguments carry the image), never from
calplug's integrations:

* **cross-attention** (Mllama): the text decoder reaches the image only through cross-attention
  states; the reference's second forward is the model's own without the pixel inputs;
* **encoder-decoder** (Florence-2, T5Gemma2, BLIP-2 with T5, UDOP): the encoder takes the image
  and the text; the reference's second forward runs the encoder on the text alone (the image
  positions hidden from the encoder and from the decoder's cross-attention, or the encoder handed
  no pixels); logits row i predicts label i;
* **positions** (Kosmos-2): the image is at positions of the decoder sequence, spliced inside the
  text model; the reference hides those positions, as for the placeholder families.

Batches hold a text-only sample at index 2 (where the model can batch one) and padding on the
given side. Tiny random models make the image matter little: each builder scales the path the
image takes (its gates, its projector) so that the CAL weights vary.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from _hf_families import IMAGE, PAD, VEND, VOCAB, VSTART, _rope, tf_version
from calplug.reference import (drop_arguments_hook, hide_positions_hook, reference_image_free_step,
                               reference_step, without_arguments)

CROSS, SEQ2SEQ, POSITIONS = "cross-attention", "encoder-decoder", "positions"


@dataclasses.dataclass
class KindFamily:
    name: str
    class_name: str
    display: str
    kind: str
    since: tuple[int, int]
    build: Callable                 # seed -> model
    batch: Callable                 # (model, padding_side, with_text_only) -> batch
    reference: Callable             # (model, batch, alpha, beta, window) -> (loss, gaps, weights)
    with_image: Callable            # (model, batch) -> bool [B]: the samples the image reaches
    decoder: Callable               # model -> the text decoder module
    vision: Callable                # model -> the vision tower (no work in the image-blind pass)
    visual: Callable | None = None  # (model, batch) -> bool [B, L] decoder image positions (positions kind)
    text_only: bool = True          # the model can batch a text-only sample with image samples
    head: Callable = lambda model: model.get_output_embeddings()  # model -> the output projection
    blur: bool = True               # the model's pixels are images [..., H, W]
    unavailable: Callable | None = None  # () -> why this release cannot run its cases, or None
    prefix: Callable | None = None  # model -> rows its logits have in front of the text (GIT), or None

    def text_logits(self, model, logits: torch.Tensor) -> torch.Tensor:
        """The model's logits at the text's rows (those the labels align with)."""
        return logits if self.prefix is None else logits[:, self.prefix(model):]

    @property
    def label_shift(self) -> int:
        """1: logits row i predicts label i + 1; 0 (encoder-decoder): label i."""
        return 0 if self.kind == SEQ2SEQ else 1

    def skip_reason(self) -> str | None:
        import transformers

        if tf_version() < self.since or not hasattr(transformers, self.class_name):
            return (f"{self.class_name} needs transformers >= {self.since[0]}.{self.since[1]} "
                    f"(installed {transformers.__version__}); run e.g. `tox -e py`")
        return self.unavailable() if self.unavailable is not None else None


def _model(class_name: str, seed: int, **config):
    import transformers

    cls = getattr(transformers, class_name)
    config = cls.config_class(**config)
    for sub in ("text_config", "vision_config", "qformer_config", "encoder", "decoder"):
        part = getattr(config, sub, None)
        if part is not None and not isinstance(part, dict):
            part._attn_implementation = "eager"
            for inner in ("text_config", "vision_config"):
                if getattr(part, inner, None) is not None:
                    getattr(part, inner)._attn_implementation = "eager"
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return cls(config)


def _scaled(model, suffixes, factor):
    """Multiply the parameters whose names end with one of ``suffixes`` by ``factor``: the image
    path of a random model carries little; a checkpoint's carries much more."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(tuple(suffixes)):
                p.mul_(factor)


def _pad(seqs, value, side, length=None):
    length = length or max(s.shape[0] for s in seqs)
    out = torch.full((len(seqs), length) + tuple(seqs[0].shape[1:]), value, dtype=seqs[0].dtype)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(0, s.shape[0]) if side == "right" else slice(length - s.shape[0], length)
        out[b, sl], mask[b, sl] = s, 1
    return out, mask


# -- cross-attention: Mllama ------------------------------------------------------------------------
MLLAMA_IMAGE_ARGS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")


def build_mllama(seed=0):
    vision = dict(image_size=16, patch_size=8, num_channels=3, hidden_size=32, intermediate_layers_indices=[0],
                  vision_output_dim=64, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
                  intermediate_size=64, max_num_tiles=2, supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1],
                pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                **_rope({"rope_type": "default", "rope_theta": 10000.0}))
    model = _model("MllamaForConditionalGeneration", seed, vision_config=vision, text_config=text,
                   image_token_index=IMAGE)
    with torch.no_grad():  # the tanh gates start at 0: the image would not reach the text at all
        for name, p in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                p.fill_(3.0)
    _scaled(model, ("multi_modal_projector.weight",), 8.0)
    return model


def mllama_batch(model, padding_side="right", text_only=True, lengths=(10, 8, 9), seed=0):
    """[2 text][<|image|>][text]; the cross-attention mask is 1 for the image's valid tiles from
    the image token on (the processor's layout); sample 2 text-only with zero pixels."""
    g = torch.Generator().manual_seed(seed)
    kinds = (True, True, not text_only)
    ids, labels, cross = [], [], []
    for n, image in zip(lengths, kinds):
        text = torch.randint(3, 240, (n,), generator=g)
        seq = torch.cat([text[:2], torch.tensor([IMAGE]), text[2:]]) if image else text
        lab = seq.clone()
        lab[:4] = -100
        tiles = torch.zeros(seq.shape[0], 1, 2, dtype=torch.long)
        if image:
            tiles[2:, 0, :1 + (len(ids) == 0)] = 1  # sample 0 two tiles, sample 1 one
        ids.append(seq)
        labels.append(lab)
        cross.append(tiles)
    input_ids, mask = _pad(ids, PAD, padding_side)
    labels, _ = _pad(labels, -100, padding_side)
    cross, _ = _pad(cross, 0, padding_side)
    B = input_ids.shape[0]
    pixels = torch.randn(B, 1, 2, 3, 16, 16, generator=g)
    ratio_ids = torch.tensor([[2], [1], [1]])[:B]
    ratio_mask = torch.tensor([[[1, 1]], [[1, 0]], [[1, 0]]])[:B]
    if not kinds[-1]:
        pixels[-1] = 0
        ratio_ids[-1], ratio_mask[-1] = 0, 0
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels, pixel_values=pixels,
                aspect_ratio_ids=ratio_ids, aspect_ratio_mask=ratio_mask, cross_attention_mask=cross)


def mllama_with_image(model, batch):
    return batch["cross_attention_mask"].flatten(1).ne(0).any(1)


def mllama_reference(model, batch, alpha, beta, window):
    """The model's own forward, and its own forward without the pixel inputs (its cross-attention
    layers then pass the text through)."""
    return reference_image_free_step(model, batch, without_arguments(batch, MLLAMA_IMAGE_ARGS),
                                     mllama_with_image(model, batch), alpha, beta, window)


def mllama_decoder(model):
    return model.model.language_model if tf_version() >= (4, 52) else model.language_model.model


def mllama_vision(model):
    return model.model.vision_model if tf_version() >= (4, 52) else model.vision_model


def build_blip(seed=0):
    # BLIP's vision config initialises its weights with std 1e-10: the image would not matter
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8, initializer_range=0.02)
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, encoder_hidden_size=32, max_position_embeddings=64, pad_token_id=PAD,
                bos_token_id=1, eos_token_id=2, sep_token_id=2, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, label_smoothing=0.0)
    model = _model("BlipForConditionalGeneration", seed, vision_config=vision, text_config=text)
    # the text decoder's cross-attention carries the image to the text
    _scaled(model, ("crossattention.self.value.weight", "crossattention.output.dense.weight"), 4.0)
    return model


def blip_batch(model, padding_side="right", text_only=False, lengths=(10, 8, 9), seed=0):
    """BLIP's captioner takes one image per sample: no text-only sample."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.cat([torch.tensor([1]), torch.randint(3, 240, (n - 1,), generator=g)]) for n in lengths]
    input_ids, mask = _pad(ids, PAD, padding_side)
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[:, :1] = -100
    labels = torch.where((mask.cumsum(1) <= 3) & (mask == 1), torch.full_like(labels, -100), labels)
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels,
                pixel_values=torch.randn(len(lengths), 3, 32, 32, generator=g))


BLIP_IMAGE_KWARGS = ("encoder_hidden_states", "encoder_attention_mask")


def blip_reference(model, batch, alpha, beta, window):
    """The model's own forward, and its own forward with its text decoder handed no image states
    (its forward needs pixels; without encoder_hidden_states its layers skip cross-attention)."""
    hooks = ((model.text_decoder.bert, drop_arguments_hook(BLIP_IMAGE_KWARGS)),)
    with_image = torch.ones(batch["input_ids"].shape[0], dtype=torch.bool)
    return reference_image_free_step(model, batch, batch, with_image, alpha, beta, window, hooks=hooks)


def build_idefics(seed=0, added=0):
    """``added``: tokens of the decoupled embedding and head (``additional_vocab_size``: the
    released checkpoints add <image> and <fake_token_around_image> so); the vocabulary stays
    VOCAB ids in all. With added tokens transformers 5.x's own Idefics loss fails (it views the
    logits with ``vocab_size``, which leaves them out), so the family cases use none and
    tests/test_kinds.py checks the decoupled head on its own."""
    vision = dict(embed_dim=32, image_size=32, patch_size=8, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)
    perceiver = dict(use_resampler=True, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                     resampler_head_dim=8)
    model = _model("IdeficsForVisionText2Text", seed, vocab_size=VOCAB - added, additional_vocab_size=added,
                   hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   cross_layer_interval=1, use_resampler=True, vision_config=vision, perceiver_config=perceiver,
                   pad_token_id=PAD, bos_token_id=1, eos_token_id=2, freeze_text_layers=False,
                   freeze_vision_layers=False, freeze_lm_head=False, alpha_initializer="ones",
                   max_position_embeddings=64)
    return model


def idefics_batch(model, padding_side="right", text_only=True, lengths=(10, 8, 9), seed=0):
    """[2 text][<image>][text] with image_attention_mask 1 from the image token on (the
    processor's layout); <image> and <fake_token_around_image> are ids VOCAB - 2, VOCAB - 1 (the
    added tokens of a decoupled head), the latter a label. Sample 2 text-only: zero pixels, zero
    image attention."""
    g = torch.Generator().manual_seed(seed)
    image_id, fake = VOCAB - 2, VOCAB - 1
    kinds_ = (True, True, not text_only)
    ids, labels, attend = [], [], []
    for n, image in zip(lengths, kinds_):
        text = torch.randint(3, 240, (n,), generator=g)
        seq = torch.cat([text[:2], torch.tensor([fake, image_id, fake]), text[2:]]) if image else text
        lab = seq.clone()
        lab[:3] = -100
        ids.append(seq)
        labels.append(lab)
        attend.append(((seq == image_id).long().cumsum(0) > 0).long().unsqueeze(-1))
    input_ids, mask = _pad(ids, PAD, padding_side)
    labels, _ = _pad(labels, -100, padding_side)
    attend, _ = _pad(attend, 0, padding_side)
    pixels = torch.randn(len(lengths), 1, 3, 32, 32, generator=g)
    if not kinds_[-1]:
        pixels[-1] = 0
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels, pixel_values=pixels,
                image_attention_mask=attend)


def idefics_reference(model, batch, alpha, beta, window):
    """The model's own forward, and its own forward with every text row attending to no image (an
    all-zero image attention mask: its gate zeroes the cross-attention output, as for text)."""
    second = dict(batch, image_attention_mask=torch.zeros_like(batch["image_attention_mask"]))
    with_image = batch["image_attention_mask"].flatten(1).ne(0).any(1)
    return reference_image_free_step(model, batch, second, with_image, alpha, beta, window)


# -- encoder-decoder ---------------------------------------------------------------------------------
def seq2seq_batch(n_image, *, pixels, text_only=True, padding_side="right", lengths=(6, 5, 7),
                  targets=(7, 5, 6), image_first=True, seed=0, extra=None):
    """Encoder input ``[n_image image tokens][text]`` (``[text]`` alone for a text-only sample),
    padded on ``padding_side``; decoder labels right-padded with -100; ``pixels(g, n)``: the
    pixel arguments of the ``n`` images."""
    g = torch.Generator().manual_seed(seed)
    kinds = (True, True, not text_only)
    ids, labels = [], []
    for n, t, image in zip(lengths, targets, kinds):
        text = torch.randint(3, 240, (n,), generator=g)
        ids.append(torch.cat([torch.full((n_image,), IMAGE), text]) if image and n_image else text)
        labels.append(torch.randint(3, 240, (t,), generator=g))
    input_ids, mask = _pad(ids, PAD, padding_side)
    labels, _ = _pad(labels, -100, "right")
    batch = dict(input_ids=input_ids, attention_mask=mask, labels=labels)
    batch.update(pixels(g, sum(kinds)))
    return batch if extra is None else extra(batch)


def decoder_inputs(model, labels):
    """The labels shifted right behind the decoder start token, -100 written as padding (how
    these models feed their decoder from labels; the ids from their text / decoder config)."""
    config = model.config
    for sub in ("text_config", "decoder"):
        config = getattr(model.config, sub, None) or config
    start = getattr(config, "decoder_start_token_id", None)
    start = getattr(model.config, "decoder_start_token_id", None) if start is None else start
    start = config.bos_token_id if start is None else start
    shifted = labels.new_full(labels.shape, start)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, PAD)


def encoder_image_positions(batch):
    return batch["input_ids"] == IMAGE


def seq2seq_reference(encoder, decoder):
    """The model's own forward, and its own forward with its encoder on the text alone: the image
    positions hidden from the encoder and from the decoder's cross-attention."""
    def reference(model, batch, alpha, beta, window):
        hidden = encoder_image_positions(batch)
        hooks = ((encoder(model), hide_positions_hook(hidden, "attention_mask")),
                 (decoder(model), hide_positions_hook(hidden, "encoder_attention_mask")))
        return reference_image_free_step(model, batch, batch, hidden.any(1), alpha, beta, window,
                                         hooks=hooks, shift=0)
    return reference


def build_florence2(seed=0):
    vision = dict(depths=(1, 1), patch_size=(7, 3), patch_stride=(4, 2), patch_padding=(3, 1),
                  patch_prenorm=(False, True), embed_dim=(16, 32), num_heads=(2, 4), num_groups=(2, 4),
                  window_size=2, drop_path_rate=0.0, projection_dim=64, max_position_embeddings=8,
                  max_temporal_embeddings=4)
    text = dict(model_type="bart", vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                decoder_ffn_dim=128, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1,
                eos_token_id=2, decoder_start_token_id=2, dropout=0.0, attention_dropout=0.0,
                activation_dropout=0.0)
    model = _model("Florence2ForConditionalGeneration", seed, vision_config=vision, text_config=text,
                   image_token_id=IMAGE)
    # the decoder's cross-attention carries what the encoder holds (of the image) to the text
    _scaled(model, ("encoder_attn.v_proj.weight", "encoder_attn.out_proj.weight"), 4.0)
    return model


FLORENCE2_TOKENS = 17  # 4 x 4 patches + the pooled feature


def florence2_batch(model, padding_side="right", text_only=True):
    return seq2seq_batch(FLORENCE2_TOKENS, padding_side=padding_side, text_only=text_only,
                         pixels=lambda g, n: {"pixel_values": torch.randn(n, 3, 32, 32, generator=g)})


def florence2_unavailable():
    if tf_version() < (5, 13):
        return ("transformers < 5.13's Florence2ForConditionalGeneration computes its own loss as a "
                "causal LM's (labels shifted once more), and calplug refuses those releases "
                "(tests/test_kinds.py checks the refusal); run e.g. `tox -e py`")
    return None


def florence2_encoder(model):
    return model.model.language_model.encoder


def florence2_decoder(model):
    return model.model.language_model.decoder


def florence2_vision(model):
    return model.model.vision_tower


def build_t5gemma2(seed=0):
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                sliding_window=4, layer_types=["sliding_attention", "full_attention"], pad_token_id=PAD,
                bos_token_id=1, eos_token_id=2)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    encoder = dict(text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=VSTART,
                   eoi_token_index=VEND, image_token_index=IMAGE)
    model = _model("T5Gemma2ForConditionalGeneration", seed, encoder=encoder, decoder=dict(text),
                   image_token_index=IMAGE, eoi_token_index=VEND)
    with torch.no_grad():  # Gemma's projector weight starts at 0: every image would embed as 0
        for name, p in model.named_parameters():
            if name.endswith("mm_input_projection_weight"):
                p.normal_(0, 1.0)
    return model


def t5gemma2_batch(model, padding_side="right", text_only=True):
    return seq2seq_batch(4, padding_side=padding_side, text_only=text_only,
                         pixels=lambda g, n: {"pixel_values": torch.randn(n, 3, 32, 32, generator=g)})


def build_blip_2_t5(seed=0, placeholders=True):
    """``placeholders=False``: a config without ``image_token_index``, whose releases before 4.50
    put the queries in front of the text (the legacy layout)."""
    vision = dict(model_type="blip_2_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    qformer = dict(model_type="blip_2_qformer", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=64, encoder_hidden_size=32,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    text = dict(model_type="t5", vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                num_decoder_layers=2, num_heads=4, pad_token_id=PAD, eos_token_id=2,
                decoder_start_token_id=PAD, dropout_rate=0.0, tie_word_embeddings=True)
    ids = {"image_token_index": IMAGE} if placeholders else {}
    model = _model("Blip2ForConditionalGeneration", seed, vision_config=vision, qformer_config=qformer,
                   text_config=text, num_query_tokens=4, **ids)
    _scaled(model, ("language_projection.weight",), 40.0)
    return model


def build_instructblip_t5(seed=0, class_name="InstructBlipForConditionalGeneration", prefix="instructblip"):
    # the vision config initialises its weights with std 1e-10 (as BLIP's): the image would not matter
    vision = dict(model_type=f"{prefix}_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
                  initializer_range=0.02)
    qformer = dict(model_type=f"{prefix}_qformer", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=64, encoder_hidden_size=32,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    text = dict(model_type="t5", vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                num_decoder_layers=2, num_heads=4, pad_token_id=PAD, eos_token_id=2,
                decoder_start_token_id=PAD, dropout_rate=0.0, tie_word_embeddings=True)
    ids = {"video_token_index": IMAGE} if "Video" in class_name else {"image_token_index": IMAGE}
    model = _model(class_name, seed, vision_config=vision, qformer_config=qformer, text_config=text,
                   num_query_tokens=4, **ids)
    _scaled(model, ("language_projection.weight",), 20.0)
    return model


def build_instructblipvideo_t5(seed=0):
    return build_instructblip_t5(seed, "InstructBlipVideoForConditionalGeneration", "instructblipvideo")


def _with_instruction(batch):
    """The Q-Former's own instruction tokens (InstructBLIP), one row per image (or video)."""
    g = torch.Generator().manual_seed(3)
    n = batch["pixel_values"].shape[0]
    batch["qformer_input_ids"] = torch.randint(3, 240, (n, 5), generator=g)
    batch["qformer_attention_mask"] = torch.ones(n, 5, dtype=torch.long)
    return batch


def instructblip_t5_batch(model, padding_side="right", text_only=True):
    """The instruction goes to the Q-Former of every sample; pixels only for the image samples
    (the text-only sample has no query placeholders)."""
    batch = seq2seq_batch(4, padding_side=padding_side, text_only=text_only,
                          pixels=lambda g, n: {"pixel_values": torch.randn(n, 3, 32, 32, generator=g)})
    return _with_instruction(batch)


def instructblipvideo_t5_batch(model, padding_side="right", text_only=True):
    """Videos of 2 frames: 4 queries a frame, 8 placeholders a sample."""
    batch = seq2seq_batch(8, padding_side=padding_side, text_only=text_only,
                          pixels=lambda g, n: {"pixel_values": torch.randn(n, 2, 3, 32, 32, generator=g)})
    return _with_instruction(batch)


def blip_2_t5_batch(model, padding_side="right", text_only=True):
    return seq2seq_batch(4, padding_side=padding_side, text_only=text_only,
                         pixels=lambda g, n: {"pixel_values": torch.randn(n, 3, 32, 32, generator=g)})


def build_udop(seed=0):
    model = _model("UdopForConditionalGeneration", seed, vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128,
                   num_layers=2, num_decoder_layers=2, num_heads=4, image_size=32, patch_size=8,
                   pad_token_id=PAD, eos_token_id=2, decoder_start_token_id=PAD, dropout_rate=0.0,
                   relative_bias_args=[{"type": "1d"}, {"type": "horizontal"}, {"type": "vertical"}])
    _scaled(model, ("patch_embed.proj.weight",), 10.0)
    return model


def udop_batch(model, padding_side="right", text_only=False):
    """Every UDOP sample carries its page image (the encoder appends its patches): no text-only
    sample. Token boxes spread over the page so each token is added to a patch."""
    def extra(batch):
        B, L = batch["input_ids"].shape
        g = torch.Generator().manual_seed(1)
        corner = torch.rand(B, L, 2, generator=g) * 0.7
        batch["bbox"] = torch.cat([corner, corner + 0.2], -1) * batch["attention_mask"].unsqueeze(-1)
        return batch
    return seq2seq_batch(0, padding_side=padding_side, text_only=False, extra=extra,
                         pixels=lambda g, n: {"pixel_values": torch.randn(n, 3, 32, 32, generator=g)})


UDOP_PIXEL_ARGS = ("pixel_values", "image_embeddings", "visual_bbox")


def udop_reference(model, batch, alpha, beta, window):
    """The model's own forward, and its own forward with its encoder handed no pixels (the text
    and its layout alone)."""
    hooks = ((model.encoder, drop_arguments_hook(UDOP_PIXEL_ARGS)),)
    with_image = torch.ones(batch["input_ids"].shape[0], dtype=torch.bool)
    return reference_image_free_step(model, batch, batch, with_image, alpha, beta, window,
                                     hooks=hooks, shift=0)


# -- Kosmos-2: image positions spliced inside the text model ---------------------------------------
KOSMOS_QUERIES = 4


def build_kosmos2(seed=0):
    text = dict(vocab_size=VOCAB, embed_dim=64, layers=2, ffn_dim=128, attention_heads=4,
                max_position_embeddings=2 * VOCAB, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                dropout=0.0, attention_dropout=0.0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    # seed + 1: at seed 0 the weights' std is 9e-4 on 4.45 / 4.49 (the faithful test asks > 1e-3);
    # seed 1 gives 3e-3 to 4e-3 on 4.45, 4.49, 4.57 and 5.25
    model = _model("Kosmos2ForConditionalGeneration", seed + 1, text_config=text, vision_config=vision,
                   latent_query_num=KOSMOS_QUERIES)
    _scaled(model, ("image_to_text_projection.dense.weight",), 4.0)
    _scaled(model, ("self_attn.v_proj.weight",), 6.0)  # the text attends to the image more
    return model


def kosmos2_batch(model, padding_side="right", text_only=True, lengths=(10, 8, 9), seed=0):
    """[2 text][<image>][queries][</image>][text], the queries marked in image_embeds_position_mask
    (the processor's layout); pixels for the image samples only."""
    g = torch.Generator().manual_seed(seed)
    kinds = (True, True, not text_only)
    ids, labels, where = [], [], []
    for n, image in zip(lengths, kinds):
        text = torch.randint(3, 240, (n,), generator=g)
        block = torch.tensor([VSTART] + [IMAGE] * KOSMOS_QUERIES + [VEND]) if image else torch.tensor([], dtype=torch.long)
        seq = torch.cat([text[:2], block, text[2:]])
        lab = seq.clone()
        lab[:2 + block.numel() + 2] = -100
        ids.append(seq)
        labels.append(lab)
        where.append((seq == IMAGE).long())
    input_ids, mask = _pad(ids, PAD, padding_side)
    labels, _ = _pad(labels, -100, padding_side)
    where, _ = _pad(where, 0, padding_side)
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels, image_embeds_position_mask=where,
                pixel_values=torch.randn(sum(kinds), 3, 32, 32, generator=g))


def build_kosmos2_5(seed=0):
    text = dict(vocab_size=VOCAB, embed_dim=64, layers=2, ffn_dim=128, attention_heads=4,
                max_position_embeddings=2 * VOCAB, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                dropout=0.0, attention_dropout=0.0)
    vision = dict(hidden_size=32, patch_embed_hidden_size=48, intermediate_size=64, head_dim=8,
                  num_hidden_layers=2, num_attention_heads=4, max_num_patches=16)
    # seed + 1: at seed 0 the tiny model's gaps barely vary with left padding on 5.25 (weights' std
    # 6.5e-4 < the 1e-3 the faithful test asks for); seed 1 gives 3e-3 to 8e-3 on 4.57 and 5.25
    model = _model("Kosmos2_5ForConditionalGeneration", seed + 1, text_config=text, vision_config=vision,
                   latent_query_num=KOSMOS_QUERIES)
    _scaled(model, ("image_to_text_projection.dense.weight",), 4.0)
    _scaled(model, ("self_attn.v_proj.weight",), 6.0)  # the text attends to the image more
    return model


def kosmos2_5_batch(model, padding_side="right", text_only=True):
    """Kosmos-2's layout; its pixels are flattened patches [n, patches, 2 + 3 * 4 * 4] (a row and
    a column index in front of each patch, 1-based), for the image samples only."""
    batch = kosmos2_batch(model, padding_side, text_only)
    n = batch.pop("pixel_values").shape[0]
    g = torch.Generator().manual_seed(2)
    rows = torch.arange(1, 5).repeat_interleave(4).float()
    cols = torch.arange(1, 5).repeat(4).float()
    index = torch.stack([rows, cols], -1).expand(n, 16, 2)
    batch["flattened_patches"] = torch.cat([index, torch.randn(n, 16, 48, generator=g)], -1)
    return batch


def kosmos2_visual(model, batch):
    return batch["image_embeds_position_mask"].bool()


def kosmos2_reference(model, batch, alpha, beta, window):
    """The placeholder families' reference: attention to the image positions removed in the mask
    the text transformer receives."""
    return reference_step(model, batch, kosmos2_visual(model, batch), alpha, beta, window, "mask",
                          decoder=model.text_model.model)


KINDS: dict[str, KindFamily] = {f.name: f for f in (
    KindFamily("mllama", "MllamaForConditionalGeneration", "Mllama", CROSS, (4, 45), build_mllama,
               mllama_batch, mllama_reference, mllama_with_image, mllama_decoder, mllama_vision),
    KindFamily("blip", "BlipForConditionalGeneration", "BLIP", CROSS, (4, 45), build_blip, blip_batch,
               blip_reference, lambda m, b: torch.ones(b["input_ids"].shape[0], dtype=torch.bool),
               lambda m: m.text_decoder.bert, lambda m: m.vision_model, text_only=False,
               head=lambda m: m.text_decoder.get_output_embeddings()),
    KindFamily("idefics", "IdeficsForVisionText2Text", "Idefics", CROSS, (4, 45), build_idefics,
               idefics_batch, idefics_reference,
               lambda m, b: b["image_attention_mask"].flatten(1).ne(0).any(1), lambda m: m.model,
               lambda m: m.model.vision_model),
    KindFamily("florence2", "Florence2ForConditionalGeneration", "Florence-2", SEQ2SEQ, (4, 56),
               build_florence2, florence2_batch, seq2seq_reference(florence2_encoder, florence2_decoder),
               lambda m, b: encoder_image_positions(b).any(1), florence2_decoder, florence2_vision,
               unavailable=florence2_unavailable),
    KindFamily("t5gemma2", "T5Gemma2ForConditionalGeneration", "T5Gemma2", SEQ2SEQ, (5, 0),
               build_t5gemma2, t5gemma2_batch,
               seq2seq_reference(lambda m: m.model.encoder.text_model, lambda m: m.model.decoder),
               lambda m, b: encoder_image_positions(b).any(1), lambda m: m.model.decoder,
               lambda m: m.model.encoder.vision_tower),
    KindFamily("blip_2_t5", "Blip2ForConditionalGeneration", "BLIP-2 (T5)", SEQ2SEQ, (4, 45),
               build_blip_2_t5, blip_2_t5_batch,
               seq2seq_reference(lambda m: m.language_model.encoder, lambda m: m.language_model.decoder),
               lambda m, b: encoder_image_positions(b).any(1), lambda m: m.language_model.decoder,
               lambda m: m.vision_model),
    KindFamily("instructblip_t5", "InstructBlipForConditionalGeneration", "InstructBLIP (T5)", SEQ2SEQ,
               (4, 45), build_instructblip_t5, instructblip_t5_batch,
               seq2seq_reference(lambda m: m.language_model.encoder, lambda m: m.language_model.decoder),
               lambda m, b: encoder_image_positions(b).any(1), lambda m: m.language_model.decoder,
               lambda m: m.vision_model),
    KindFamily("instructblipvideo_t5", "InstructBlipVideoForConditionalGeneration",
               "InstructBLIP-Video (T5)", SEQ2SEQ, (4, 45), build_instructblipvideo_t5,
               instructblipvideo_t5_batch,
               seq2seq_reference(lambda m: m.language_model.encoder, lambda m: m.language_model.decoder),
               lambda m, b: encoder_image_positions(b).any(1), lambda m: m.language_model.decoder,
               lambda m: m.vision_model, blur=True),
    KindFamily("udop", "UdopForConditionalGeneration", "UDOP", SEQ2SEQ, (4, 39), build_udop, udop_batch,
               udop_reference, lambda m, b: torch.ones(b["input_ids"].shape[0], dtype=torch.bool),
               lambda m: m.decoder, lambda m: m.encoder.embed_patches, text_only=False),
    KindFamily("kosmos2", "Kosmos2ForConditionalGeneration", "Kosmos-2", POSITIONS, (4, 35),
               build_kosmos2, kosmos2_batch, kosmos2_reference,
               lambda m, b: kosmos2_visual(m, b).any(1), lambda m: m.text_model.model,
               lambda m: m.vision_model, visual=kosmos2_visual),
    KindFamily("kosmos2_5", "Kosmos2_5ForConditionalGeneration", "Kosmos-2.5", POSITIONS, (4, 56),
               build_kosmos2_5, kosmos2_5_batch, kosmos2_reference,
               lambda m, b: kosmos2_visual(m, b).any(1), lambda m: m.text_model.model,
               lambda m: m.vision_model, visual=kosmos2_visual, blur=False),
)}

# The image-prefix kind (GIT: tests/_hf_prefix.py); imported last: it builds on the helpers above.
from _hf_prefix import PREFIX, PREFIX_KINDS  # noqa: E402

KINDS.update(PREFIX_KINDS)
