"""The deliberately independent reference of CAL: the loss by its two-forward definition, written
without calplug's step. The one second implementation calplug keeps, shared by ``calplug verify``
and the tests.

Two calls of the model's own forward: the usual one (with grad), and one (no grad) in which a
forward pre-hook on the text decoder takes the image out of what the decoder receives: with
``contrast="mask"`` (the published one) no query may attend to an image position, in whatever
attention mask the model built (2-D, 4-D, or a dict of 4-D masks per layer type); with
``"drop"`` the image positions leave the sequence (text keeps its positions). Then steps 3-7 of
docs/cal.md from full float32 logits: the target logits, the gaps, the clamp, the flat average
pooling and the weighted, normalised cross-entropy, exactly as the published code computes them.

Nothing here imports calplug's step, contrasts, gaps, weighting or loss (tests/test_layout.py
checks it): a bug there cannot hide in the reference. Because the second pass is the model's own
forward, every transform the model applies to its logits (soft-capping, scaling) is in both.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CALInputError

IGNORE_INDEX = -100   # transformers' ignore index, written here so the reference shares no code


# -- steps 3-7 from full logits ---------------------------------------------------------------------
def _aligned(logits, labels, shift):
    """Rows and their targets: row i predicts label i + 1 (``shift=1``, a causal LM) or label i
    (``shift=0``, a sequence-to-sequence decoder's logits and labels)."""
    if shift == 1:
        return logits[:, :-1], labels[:, 1:]
    if shift == 0:
        return logits, labels
    raise CALInputError(f"label shift {shift!r}: 1 (causal LM) or 0 (sequence-to-sequence)")


def reference_weights(logits, logits_wo, labels, alpha=1.0, beta=5.0, window=3, *, shift=1):
    """Steps 3-6: flat ``[N]`` weights and gaps, N = B * (L - 1) (``shift=1``; B * L with
    ``shift=0``), from ``[B, L, V]`` logits with (``logits``) and without (``logits_wo``) the
    image."""
    V = logits.shape[-1]
    rows, targets = _aligned(logits, labels, shift)
    s_logits = rows.reshape(-1, V).float()
    s_logits_wo = _aligned(logits_wo, labels, shift)[0].reshape(-1, V).float()
    s_labels = targets.reshape(-1)
    y = s_labels.clone()
    y[y == IGNORE_INDEX] = 0
    rows = torch.arange(y.numel(), device=y.device)
    delta = s_logits[rows, y] - s_logits_wo[rows, y]
    w = delta.clamp(min=alpha, max=beta)
    if window > 1:
        w = F.avg_pool1d(w.view(1, 1, -1), kernel_size=window, stride=1, padding=window // 2,
                         count_include_pad=False).view(-1)
    return w.detach(), delta.detach()


def reference_cal_loss(logits, logits_wo, labels, alpha=1.0, beta=5.0, window=3, *, shift=1):
    """Step 7: ``sum(ce * w) / (sum_{not ignored} w + 1e-6)``."""
    V = logits.shape[-1]
    w, _ = reference_weights(logits, logits_wo, labels, alpha, beta, window, shift=shift)
    rows, targets = _aligned(logits, labels, shift)
    s_logits = rows.reshape(-1, V).float()
    s_labels = targets.reshape(-1)
    ce = F.cross_entropy(s_logits, s_labels, ignore_index=IGNORE_INDEX, reduction="none")
    valid = s_labels != IGNORE_INDEX
    return (ce * w).sum() / (w[valid].sum() + 1e-6)


# -- the two forwards --------------------------------------------------------------------------------
def reference_step(model: nn.Module, batch: dict, visual: torch.Tensor, alpha: float, beta: float,
                   window: int, contrast: str = "mask", *, decoder: nn.Module,
                   positions: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CAL loss by the two-forward definition, without calplug's step (`reference_forwards`,
    then steps 3-7 at one setting). Returns ``(loss, gaps [N], weights [N])``, N = B * (L - 1)."""
    forwards = reference_forwards(model, batch, visual, contrast, decoder=decoder, positions=positions)
    return reference_at(forwards, batch["labels"], alpha, beta, window)


def reference_forwards(model: nn.Module, batch: dict, visual: torch.Tensor, contrast: str = "mask",
                       *, decoder: nn.Module, positions: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The two forwards of the definition, shared by every setting (alpha, beta, window): the
    model's own forward (with grad), and a second forward (no grad) in which a pre-hook on the
    text decoder removes the image positions ``visual [B, L]``: ``contrast="mask"`` (the
    published one) hides them from every query in whatever attention mask the model built;
    ``"drop"`` takes them out of the decoder's sequence (text keeps its positions; a removed row
    takes the state of the last text position before it, as docs/cal.md defines). Returns
    ``(logits, logits_wo, extra)``: full logits with and without the image, and what the model
    adds to its cross-entropy (a router's load-balancing loss: its own loss minus the plain
    cross-entropy of its logits), or None where it adds nothing. ``decoder``: the module the
    model hands its merged embeddings to. ``positions [B, L]``: for a decoder handed no position
    ids that numbers positions from the mask it receives (OPT: the running sum of
    ``attention_mask``), the numbering of the first forward, handed to the second explicitly
    (hiding or removing the image would renumber the text after it); checked first to be the
    model's own (`check_positions`)."""
    out = model(**batch)
    logits = _logits(out)
    if positions is not None:
        check_positions(model, batch, logits, positions, decoder)
    attention = batch.get("attention_mask")
    attention = torch.ones_like(visual, dtype=torch.long) if attention is None else attention
    if contrast == "mask":
        handle = decoder.register_forward_pre_hook(mask_image_hook(visual, positions), with_kwargs=True)
        second = batch
    else:
        keep = attention.bool() & ~visual
        handle = decoder.register_forward_pre_hook(remove_image_hook(keep, positions), with_kwargs=True)
        # the sequence is shorter: no labels, and no router statistics over the outer padding mask
        second = {k: v for k, v in batch.items() if k != "labels"}
        if "output_router_logits" in inspect.signature(model.forward).parameters:
            second["output_router_logits"] = False
    try:
        with torch.no_grad():
            logits_wo = _logits(model(**second))
    finally:
        handle.remove()
    if contrast == "drop":
        logits_wo = spread(logits_wo, keep, visual.any(1), logits.detach())
    if logits_wo.shape != logits.shape:
        raise CALInputError("the model's logits changed shape when image positions were hidden")
    return logits, logits_wo, _added_loss(out, logits, batch["labels"])


def reference_pixel_forwards(model: nn.Module, batch: dict, transform, keys, labels=None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The two forwards of a pixel-level contrast (the paper's blur) by its definition: the
    model's own forward (with grad), and its own whole forward again (no grad) on the batch whose
    pixel tensors under ``keys`` (or each tensor of a list under them) are ``transform(pixels)``.
    No hook and no re-run of a vision path: what calplug's contrast must equal. Returns
    ``(logits, logits_wo, extra)`` as `reference_forwards` does (for `reference_at`); ``labels``:
    those of the logits' sequence where the model builds another one (default: the batch's)."""
    out = model(**batch)
    logits = _logits(out)
    changed = dict(batch)
    for key in keys:
        value = batch[key]
        changed[key] = (transform(value) if isinstance(value, torch.Tensor)
                        else type(value)(transform(v) for v in value))
    with torch.no_grad():
        logits_wo = _logits(model(**changed))
    if logits_wo.shape != logits.shape:
        raise CALInputError("the model's logits changed shape when its pixels were transformed")
    return logits, logits_wo, _added_loss(out, logits, batch["labels"] if labels is None else labels)


def reference_blur(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    """The Gaussian blur the blur contrast is defined with, over the last two dimensions ``[...,
    H, W]``: weights ``exp(-x^2 / (2 sigma^2))`` for ``|x| <= r``, ``r = ceil(3 sigma)`` (at
    least 1) clipped to ``H - 1`` and ``W - 1``, normalised to sum 1, reflect padding (the edge
    pixel not repeated), rows then columns. Written as two ``[n, n]`` blur matrices in float64,
    sharing no code with calplug's convolution."""
    H, W = pixels.shape[-2:]
    radius = min(max(1, math.ceil(3.0 * sigma)), H - 1, W - 1)
    offsets = list(range(-radius, radius + 1))
    kernel = [math.exp(-0.5 * (x / sigma) ** 2) for x in offsets]
    kernel = [k / sum(kernel) for k in kernel]

    def matrix(n: int) -> torch.Tensor:
        m = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            for x, k in zip(offsets, kernel):
                j = abs(i + x)                          # reflect at 0 ...
                j = 2 * (n - 1) - j if j > n - 1 else j  # ... and at n - 1
                m[i, j] += k
        return m

    blurred = matrix(H).to(pixels.device) @ pixels.double() @ matrix(W).to(pixels.device).T
    return blurred.to(pixels.dtype)


def _added_loss(out, logits: torch.Tensor, labels: torch.Tensor, shift: int = 1
                ) -> torch.Tensor | None:
    """What the model adds to plain cross-entropy (a router's load-balancing term): its own loss
    minus the plain cross-entropy of its logits, or None where that is round-off."""
    own = _loss(out)
    if own is None:
        return None
    V = logits.shape[-1]
    rows, targets = _aligned(logits, labels, shift)
    plain = F.cross_entropy(rows.reshape(-1, V).float(), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX)
    # Most models add nothing: their loss equals plain cross-entropy up to round-off, whose
    # gradient would only add noise to the reference's. Above 1e-5 of it, the term is real.
    if abs(float(own.detach()) - float(plain.detach())) > 1e-5 * abs(float(plain.detach())):
        return own.float() - plain
    return None


def reference_at(forwards: tuple, labels: torch.Tensor, alpha: float, beta: float, window: int,
                 *, shift: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 3-7 at one setting from `reference_forwards`' result: ``(loss, gaps [N], weights
    [N])``; the loss carries the gradient of the main forward (call ``backward`` with
    ``retain_graph=True`` to take another setting's from the same forwards)."""
    logits, logits_wo, extra = forwards
    weights, gaps = reference_weights(logits, logits_wo, labels, alpha, beta, window, shift=shift)
    loss = reference_cal_loss(logits, logits_wo, labels, alpha, beta, window, shift=shift)
    return (loss if extra is None else loss + extra), gaps, weights


def _cal(out, logits, logits_wo, labels, alpha, beta, window, *, shift):
    """``(loss, gaps, weights)`` of steps 3-7, plus whatever the model adds to plain
    cross-entropy (a router's load-balancing term), from one pair of forwards."""
    return reference_at((logits, logits_wo, _added_loss(out, logits, labels, shift)), labels,
                        alpha, beta, window, shift=shift)


def check_positions(model: nn.Module, batch: dict, logits: torch.Tensor, positions: torch.Tensor,
                    decoder: nn.Module) -> None:
    """``positions`` are the numbering the model's decoder gives itself: its forward with them
    handed to the decoder (where it received none) gives the same logits. `CALInputError` if not."""

    def pre_hook(module, args, kwargs):
        if kwargs.get("position_ids") is not None:
            return None
        return args, dict(kwargs, position_ids=positions.to(check_sequence(kwargs, positions.shape).device))

    handle = decoder.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            again = _logits(model(**{k: v for k, v in batch.items() if k != "labels"}))
    finally:
        handle.remove()
    if again.shape != logits.shape or not torch.allclose(again.float(), logits.detach().float(),
                                                         rtol=1e-5, atol=1e-5):
        raise CALInputError("the position ids given to the reference are not the ones the model's "
                            "decoder numbers its sequence with: its forward with them gives other logits")


# -- models whose image is not (only) at positions of the decoder sequence ----------------------------
def reference_image_free_step(model: nn.Module, batch: dict, second: dict, with_image: torch.Tensor,
                              alpha: float, beta: float, window: int, *, hooks=(), shift: int = 1,
                              prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CAL loss by the two-forward definition for a model whose image reaches the text
    elsewhere than at positions of its decoder sequence (cross-attention states, an encoder's
    output): the model's own forward on ``batch`` (with grad), and its own forward again (no
    grad) on ``second`` (the batch without the arguments that carry the image; its labels give a
    sequence-to-sequence model its decoder inputs) with ``hooks``
    ``((module, pre_hook), ...)`` installed (an encoder run on the text alone). Samples outside
    ``with_image [B]`` take the main logits: nothing to take away, gap 0. ``shift``: 1 when
    logits row i predicts label i + 1, 0 when it predicts label i (sequence-to-sequence).
    ``prefix``: rows the first forward puts in front of the text (GIT's image), which the second
    does not have: left out of its logits. Full float32 logits, flat pooling. Returns ``(loss,
    gaps [N], weights [N])``."""
    out = model(**batch)
    logits = _logits(out)[:, prefix:]
    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module, hook in hooks]
    try:
        with torch.no_grad():
            logits_wo = _logits(model(**second))
    finally:
        for handle in handles:
            handle.remove()
    if logits_wo.shape != logits.shape:
        raise CALInputError("the model's logits changed shape when its image was taken out")
    keep = with_image.to(logits.device).view(-1, *([1] * (logits.dim() - 1)))
    logits_wo = torch.where(keep, logits_wo, logits.detach())
    return _cal(out, logits, logits_wo, batch["labels"], alpha, beta, window, shift=shift)


def without_arguments(batch: dict, names) -> dict:
    """``batch`` without the forward arguments ``names`` (a cross-attention model's pixels and
    cross-attention mask: its own forward then runs the text alone)."""
    return {k: v for k, v in batch.items() if k not in set(names)}


def drop_arguments_hook(names):
    """A forward pre-hook that hands the module ``None`` for each of ``names`` (an encoder that
    embeds pixels itself, run without them; a text decoder given no cross-attention states)."""

    def pre_hook(module, args, kwargs):
        return args, dict(kwargs, **{name: None for name in names if name in kwargs})

    return pre_hook


def hide_positions_hook(hidden: torch.Tensor, argument: str):
    """A forward pre-hook that zeroes the ``hidden [B, L]`` positions of the 2-D mask the module
    receives as ``argument`` (ones when it receives none): an encoder's ``attention_mask`` (no
    query attends to an image position: the text alone, each token at its own position) and a
    decoder's ``encoder_attention_mask`` (its cross-attention skips the encoder's image rows)."""

    def pre_hook(module, args, kwargs):
        mask = kwargs.get(argument)
        keys = hidden
        if mask is None:
            mask = torch.ones(keys.shape, dtype=torch.long, device=keys.device)
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape == keys.shape):
            raise CALInputError(f"{type(module).__name__} received {argument} of shape "
                                f"{tuple(getattr(mask, 'shape', ()))}, not the [batch, seq_len] "
                                f"{tuple(keys.shape)} mask the reference edits")
        return args, dict(kwargs, **{argument: mask * (~keys.to(mask.device)).to(mask.dtype)})

    return pre_hook


def pixel_positions(model: nn.Module, batch: dict, replaced: dict, *, decoder: nn.Module) -> torch.Tensor:
    """bool ``[B, L]``: where the pixels reach the text decoder's sequence, found without knowing
    the model: the positions whose decoder input embedding changes when the pixels are replaced
    (``replaced``: ``batch`` with other pixels of the same shape); for a decoder that embeds (and
    splices) for itself, handed token ids, the input of its first layer. Image positions whose
    input does not depend on the pixels (a learned separator between image rows) are not among
    them. Two no-grad forwards."""
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs.get("inputs_embeds"))

    def record_layer(module, args, kwargs):
        seen.append(args[0] if args else kwargs.get("hidden_states"))

    layers = getattr(decoder, "layers", None)
    handles = [decoder.register_forward_pre_hook(record, with_kwargs=True)]
    if isinstance(layers, nn.ModuleList) and len(layers):
        handles.append(layers[0].register_forward_pre_hook(record_layer, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**batch)
            model(**replaced)
    finally:
        for handle in handles:
            handle.remove()
    # per forward: the decoder's inputs_embeds, then (where it has layers) its first layer's input
    per_call = len(handles)
    calls = [seen[i:i + per_call] for i in range(0, len(seen), per_call)]
    picked = [next((x for x in call if x is not None), None) for call in calls]
    first, second = (picked[0], picked[-1]) if len(picked) == 2 else (None, None)
    if first is None or second is None or first.shape != second.shape:
        raise CALInputError("the text decoder did not receive inputs_embeds (nor its first layer a "
                            "sequence) of the same shape for the batch and the batch with other pixels")
    return (first != second).flatten(2).any(-1)


def pixel_samples(model: nn.Module, batch: dict, replaced: dict) -> torch.Tensor:
    """bool ``[B]``: the samples the pixels reach, found without knowing the model: those whose
    logits change when the pixels are replaced (``replaced``: ``batch`` with other pixels of the
    same shape). For models whose image enters elsewhere than at positions of the decoder
    sequence (cross-attention states, an encoder). Two no-grad forwards."""
    with torch.no_grad():
        first, second = _logits(model(**batch)), _logits(model(**replaced))
    if first.shape != second.shape:
        raise CALInputError("the model's logits changed shape when the pixels were replaced")
    scale = float(first.abs().max().clamp(min=1.0))
    return (first.float() - second.float()).flatten(1).abs().amax(1) > 1e-5 * scale


def check_sequence(kwargs: dict, shape: torch.Size) -> torch.Tensor:
    """What gives the decoder's call its ``[batch, seq_len]``: its ``inputs_embeds``, or its
    ``input_ids`` where it embeds (and splices, as Kosmos does) for itself."""
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = kwargs.get("input_ids")
    if embeds is None or embeds.shape[:2] != shape:
        raise CALInputError(
            "the text decoder did not receive inputs_embeds of the batch's [batch, seq_len] "
            f"{tuple(shape)}: verify handles models that splice image features into the input_ids "
            "sequence at placeholder tokens (transformers' VLM classes); LLaVA-codebase models are "
            "proven by calplug's own tests (tox -e llava)")
    return embeds


def mask_image_hook(visual: torch.Tensor, positions: torch.Tensor | None = None):
    """A decoder pre-hook: no query may attend to a ``visual`` key, in a 2-D padding mask (or none),
    a 4-D mask (boolean: True = attend; float: 0 = attend), or a dict of 4-D masks per layer type.
    A 4-D mask's row left with no key at all keeps its own position. ``positions``: handed to a
    decoder that received no position ids (one that would number them from the edited mask)."""

    def hide(mask, embeds):
        if isinstance(mask, dict):
            return {k: hide(v, embeds) for k, v in mask.items()}
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        keys = visual.to(mask.device)
        if mask.dim() == 2:
            return mask * (~keys).to(mask.dtype)
        if mask.dim() == 4:
            B, L = keys.shape
            allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
            allowed = allowed.expand(B, *allowed.shape[1:])
            kept = allowed & ~keys[:, None, None, :]
            # a row left with no key (an image row that saw only image keys) keeps itself, as
            # calplug's contrast does (docs/transformers.md): no all-blocked row
            emptied = ~kept.any(-1, keepdim=True) & allowed.any(-1, keepdim=True)
            kept = kept | (emptied & torch.eye(L, dtype=torch.bool, device=kept.device))
            if mask.dtype == torch.bool:
                return kept
            return torch.zeros(kept.shape, dtype=mask.dtype, device=mask.device).masked_fill(
                ~kept, torch.finfo(mask.dtype).min)
        raise CALInputError(f"the decoder received an attention mask of shape {tuple(mask.shape)}, "
                            "which verify's reference cannot edit")

    def pre_hook(module, args, kwargs):
        embeds = check_sequence(kwargs, visual.shape)
        new = dict(kwargs, attention_mask=hide(kwargs.get("attention_mask"), embeds))
        if positions is not None and kwargs.get("position_ids") is None:
            new["position_ids"] = positions.to(embeds.device)
        return args, new

    return pre_hook


def remove_image_hook(keep: torch.Tensor, positions: torch.Tensor | None = None):
    """A decoder pre-hook: the decoder runs on the ``keep [B, L]`` positions of each sample only,
    packed to the left in order (right padding), each with its original position id (the
    decoder's, else ``positions``, else 0..L-1). Every ``[B, L, ...]`` input is gathered alike; a
    2-D padding mask (or none); a per-layer-type dict of masks is replaced by the packed 2-D
    mask, from which the decoder builds its own (as transformers' decoders do when not handed a
    dict: Inkling's is built by the model before it calls the decoder)."""
    B, L = keep.shape
    counts = keep.sum(1)
    length = max(int(counts.max()), 1)
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :length]

    def pre_hook(module, args, kwargs):
        embeds = check_sequence(kwargs, keep.shape)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict):
            mask = None
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            raise CALInputError("the decoder received a ready-made 4-D attention mask, which "
                                "verify's drop reference does not rebuild")
        new = {}
        idx = order.to(embeds.device)
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == (B, L) \
                    and name != "attention_mask":
                index = idx.view(B, length, *([1] * (value.dim() - 2))).expand(B, length, *value.shape[2:])
                new[name] = value.gather(1, index)
        given = kwargs.get("position_ids")
        if given is None:
            given = positions.to(embeds.device) if positions is not None else \
                torch.arange(L, device=embeds.device).expand(B, L)
        lead = given.shape[:-2]
        given = given.expand(*lead, B, L)
        new["position_ids"] = given.gather(-1, idx.expand(*lead, B, length))
        packed = torch.arange(length, device=embeds.device).unsqueeze(0) < counts.to(embeds.device).unsqueeze(1)
        new["attention_mask"] = packed.long() if mask is None else packed.to(mask.dtype)
        for name in ("past_key_values", "cache_position"):
            if name in kwargs:
                new[name] = None
        if "use_cache" in kwargs:
            new["use_cache"] = False
        return args, dict(kwargs, **new)

    return pre_hook


def spread(short: torch.Tensor, keep: torch.Tensor, with_image: torch.Tensor,
            logits: torch.Tensor) -> torch.Tensor:
    """``[B, L, V]`` contrast logits from the ``[B, L', V]`` logits of the kept positions: each row
    takes the last kept position at or before it; rows with none, and samples without an image,
    take the main logits (gap 0)."""
    rank = keep.long().cumsum(1) - 1
    index = rank.clamp(min=0).unsqueeze(-1).expand(-1, -1, short.shape[-1])
    spread = short.gather(1, index.to(short.device))
    use_main = (rank < 0) | ~with_image.unsqueeze(1)
    return torch.where(use_main.unsqueeze(-1), logits, spread)


# -- outputs -----------------------------------------------------------------------------------------
def _logits(out) -> torch.Tensor:
    if isinstance(out, tuple):
        return out[1] if out[0].dim() == 0 else out[0]
    return out.logits


def _loss(out) -> torch.Tensor | None:
    if isinstance(out, tuple):
        return out[0] if out[0].dim() == 0 else None
    return out.loss
