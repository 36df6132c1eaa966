"""`calplug.verify(model, batch)`: the checks of calplug's family tests, run on your own model.

calplug proves each transformers family it integrates on tiny seeded models (tests/cases.py,
tests/test_properties.py). A model whose class the integration matches but whose family has no
proof there, or a checkpoint with a configuration the tiny models do not have, can be checked
here, on the model itself and one of its training batches:

(a) **the contrast pass is blind to the image**: replacing the pixels leaves the contrast-side
    target logits of every text row unchanged (``drop`` and the published ``mask``), and changes
    the main side's (so the image really reaches the model, and the first check means something);
(b) **faithful mode equals an independent two-forward reference**: the model's own forward, and a
    second forward of the whole model with attention to the image positions removed (a pre-hook on
    the text decoder hides them in whatever mask the model built), turned into the CAL loss by the
    formula of docs/cal.md written out here with full logits; loss, gaps, weights and gradients.
    The reference never goes through calplug's step. Also: ``drop`` equals ``mask`` on text rows.
    Where the integration refuses ``mask`` (decoders whose conv / linear-attention layers ignore
    mask holes), the default ``drop`` is compared with a reference whose second forward runs the
    decoder on the text positions only (each at its original position);
(c) **unit weights give the model's own loss** (alpha = beta = 1);
(d) **disable restores** the forward: outputs bit-identical to before ``enable``.

The model is left as it was found: enabled state and config, train/eval mode, gradients.
Dropout is switched off for the checks (two forwards must see the same network).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .config import CALConfig
from .errors import CALInputError
from .gap import IGNORE_INDEX

PIXEL_PREFIX = "pixel_values"        # pixel_values, pixel_values_videos, ...: what "the image" is
PLACEHOLDER_NAMES = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
FAITHFUL = dict(contrast="mask", pool_scope="flat", alpha=0.0, beta=5.0, pool_window=3)
MIN_WEIGHT_STD = 1e-3                # faithful weights must vary, or the loss check proves little
# Tolerances are fp32 round-off; models in half precision get them multiplied by this factor.
PRECISION_FACTOR = {torch.float16: 100.0, torch.bfloat16: 1000.0}


@dataclasses.dataclass
class Check:
    """One row of the report: what was checked, whether it held, the number measured and the bound
    it was held to (``tolerance`` reads as a condition on ``measured``)."""

    name: str
    passed: bool
    measured: float
    tolerance: str
    note: str = ""


@dataclasses.dataclass
class Report:
    """What `verify` found. ``passed`` when every check held; `table` is what ``calplug verify``
    prints."""

    model: str
    setting: str
    checks: list[Check]
    support: tuple[str, str] | None = None
    notes: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def table(self) -> str:
        lines = [f"calplug verify: {self.model} ({self.setting})"]
        if self.support is not None:
            status, reason = self.support
            lines.append(f"support matrix: {status}" + (f" ({reason})" if reason else ""))
        lines += [f"note: {note}" for note in self.notes]
        width = max(len(c.name) for c in self.checks)
        lines += ["", f"{'check':<{width}}  result  {'measured':>9}  tolerance",
                  f"{'-' * width}  ------  {'-' * 9}  ---------"]
        for c in self.checks:
            lines.append(f"{c.name:<{width}}  {'pass' if c.passed else 'FAIL':<6}  "
                         f"{_number(c.measured):>9}  {c.tolerance}")
        notes = [c for c in self.checks if c.note and not c.passed]
        lines.append("")
        for c in notes:
            lines.append(f"FAIL {c.name}: {c.note}")
        n = len(self.checks)
        lines.append(f"{n} checks: all passed" if self.passed
                     else f"{n} checks: {len(self.failed)} FAILED")
        return "\n".join(lines)

    __str__ = table


def _number(x: float) -> str:
    if x == 0:
        return "0"
    if math.isnan(x) or math.isinf(x):
        return str(x)
    return f"{x:.2e}"


# -- the entry point ------------------------------------------------------------------------------
def verify(model: nn.Module, batch: dict, *, gradients: bool = True, seed: int = 0) -> Report:
    """Run checks (a)-(d) of this module's docstring on ``model`` and one training ``batch``
    (the keyword arguments of its forward, ``labels`` included, ``[B, L]`` aligned with
    ``input_ids``; at least one sample with an image). ``gradients=False`` skips the gradient
    comparison (one backward pass fewer, no second set of gradients in memory). Returns a `Report`;
    raises `CALInputError` for a batch it cannot check and `UnsupportedModelError` for a model
    calplug cannot enable."""
    from . import enabling
    from .step import STATE_ATTR

    target = enabling.unwrap_model(model)
    layout = _layout(target, batch)
    integration = enabling.find_integration(target)
    if integration.check is not None:
        integration.check(target)
    previous = target.__dict__.get(STATE_ATTR)
    was_training = target.training
    saved_grads = {p: p.grad for p in target.parameters()}
    if previous is not None:
        enabling.disable(target)
    try:
        target.train()
        for p in target.parameters():
            p.grad = None
        with _dropout_off(target):
            checks = _run_checks(target, batch, layout, integration, gradients, seed)
    finally:
        enabling.disable(target)
        if previous is not None:
            enabling.enable(target, previous.config)
        target.train(was_training)
        for p, g in saved_grads.items():
            p.grad = g
    dtype = _dtype(target)
    setting = (f"transformers {_transformers_version()}, {str(dtype).removeprefix('torch.')}, "
               f"batch of {layout.visual.shape[0]} samples, {int(layout.with_image.sum())} with images or videos, "
               f"integration {integration.name}")
    refusal = _mask_refusal(target, integration)
    notes = (f"contrast='mask' is refused for this model ({refusal}); the default drop is checked "
             "against a reference that removes the image positions",) if refusal else ()
    return Report(type(target).__name__, setting, checks, _support(target), notes)


def _mask_refusal(model: nn.Module, integration) -> str | None:
    """Why the integration refuses the published mask contrast for this model (None: it does not)."""
    if integration.contrast_refusal is None:
        return None
    return integration.contrast_refusal(model, "mask")


# -- layout of the batch --------------------------------------------------------------------------
@dataclasses.dataclass
class _Layout:
    labels: torch.Tensor      # [B, L]
    visual: torch.Tensor      # bool [B, L]: image / video placeholder positions
    attention: torch.Tensor   # [B, L] padding mask
    pixel_keys: tuple[str, ...]

    @property
    def with_image(self) -> torch.Tensor:
        return self.visual.any(1)

    @property
    def text_rows(self) -> torch.Tensor:
        """bool ``[B, L-1]``: shifted rows at text (not image, not padding) positions of samples
        with an image: where the contrast side must not see the image, and drop must equal mask."""
        text = self.attention.bool() & ~self.visual & self.with_image.unsqueeze(1)
        return text[:, :-1]


def placeholder_positions(config, input_ids: torch.Tensor) -> torch.Tensor:
    """bool ``[B, L]``: positions of the config's image and video placeholder ids. Read here from
    the config, independently of the integration's own reading."""
    ids = {int(v) for v in (getattr(config, n, None) for n in PLACEHOLDER_NAMES) if v is not None}
    out = torch.zeros_like(input_ids, dtype=torch.bool)
    for i in ids:
        out |= input_ids == i
    return out


def _layout(model: nn.Module, batch: dict) -> _Layout:
    if not isinstance(batch, dict):
        raise CALInputError(f"verify takes the batch as a dict of forward arguments, got {type(batch).__name__}")
    input_ids, labels = batch.get("input_ids"), batch.get("labels")
    if not isinstance(input_ids, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise CALInputError("verify needs a training batch with input_ids and labels (the forward's "
                            "keyword arguments, as the trainer passes them)")
    if labels.shape != input_ids.shape or labels.dim() != 2:
        raise CALInputError(f"labels {tuple(labels.shape)} must be [batch, seq_len] aligned with input_ids "
                            f"{tuple(input_ids.shape)}")
    if not bool((labels[:, 1:] != IGNORE_INDEX).any()):
        raise CALInputError("every label of the batch is -100: verify needs supervised tokens")
    visual = placeholder_positions(model.config, input_ids)
    if not bool(visual.any()):
        names = ", ".join(n for n in PLACEHOLDER_NAMES if getattr(model.config, n, None) is not None)
        raise CALInputError(f"no sample of the batch holds an image placeholder ({names or 'no placeholder id in the config'}): "
                            "verify needs a batch with at least one image")
    pixel_keys = tuple(k for k, v in batch.items() if k.startswith(PIXEL_PREFIX) and _has_floats(v))
    if not pixel_keys:
        raise CALInputError(f"the batch has image placeholders but no {PIXEL_PREFIX}* tensor: pass the "
                            "processor's pixel values")
    attention = batch.get("attention_mask")
    if attention is None:
        attention = torch.ones_like(input_ids)
    return _Layout(labels, visual, attention, pixel_keys)


def _has_floats(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and value.numel() > 0
    return isinstance(value, (list, tuple)) and any(_has_floats(v) for v in value)


def _replace_pixels(value, g: torch.Generator):
    """Other pixels of the same shape: seeded noise at the scale of the originals. All-zero
    entries stay zero (Idefics-type processors mark padding images that way)."""
    if isinstance(value, (list, tuple)):
        return type(value)(_replace_pixels(v, g) for v in value)
    if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
        return value
    x = value.float()
    noise = torch.randn(x.shape, generator=g) * x.std().clamp(min=1e-3) + x.mean()
    return torch.where(x == 0, x, noise.to(x.device)).to(value.dtype)


# -- the checks -----------------------------------------------------------------------------------
def _run_checks(model, batch, layout: _Layout, integration, gradients: bool, seed: int) -> list[Check]:
    from . import enabling

    factor = PRECISION_FACTOR.get(_dtype(model), 1.0)
    checks: list[Check] = []
    targets = layout.labels[:, 1:].clamp(min=0)
    rows = layout.text_rows
    refusal = _mask_refusal(model, integration)
    contrasts = ("drop",) if refusal else ("drop", "mask")

    # (d) disable restores; the model's own loss for (c)
    had_forward = "forward" in model.__dict__
    with torch.no_grad():
        before = model(**batch)
        enabling.enable(model, CALConfig())
        model(**batch)
        enabling.disable(model)
        after = model(**batch)
    own_loss = _loss(before)
    diff = max(_max_diff(_logits(before), _logits(after)), _max_diff(own_loss, _loss(after)))
    restored = diff == 0 and ("forward" in model.__dict__) == had_forward
    checks.append(Check("disable restores the forward (bit-identical)", restored, diff, "= 0",
                        "outputs after enable + disable differ from before" if diff
                        else "the instance's forward attribute was not restored"))

    # (a) the contrast side blind to the image, the main side not; drop = mask on text rows
    g = torch.Generator().manual_seed(seed)
    replaced = dict(batch, **{k: _replace_pixels(batch[k], g) for k in layout.pixel_keys})
    gaps, main_moved, blind_tol = {}, 0.0, 0.0
    for contrast in contrasts:
        with torch.no_grad(), enabling.enabled(model, CALConfig(contrast=contrast)):
            out, out_replaced = model(**batch), model(**replaced)
        main, main_replaced = _target_logits(out, targets), _target_logits(out_replaced, targets)
        side, side_replaced = main - out.cal_gaps.float(), main_replaced - out_replaced.cal_gaps.float()
        tol = 1e-5 * max(1.0, float(main[rows].abs().max())) * factor
        blind_tol = max(blind_tol, tol)
        moved = float((side - side_replaced)[rows].abs().max())
        checks.append(Check(f"contrast pass blind to the image ({contrast})", moved <= tol, moved,
                            f"<= {tol:.1e}",
                            "replacing the pixels changed the contrast-side target logits of text rows: "
                            "the image leaks into the contrast pass"))
        main_moved = max(main_moved, float((main - main_replaced)[rows].abs().max()))
        gaps[contrast] = out.cal_gaps.float()
    need = 10 * blind_tol
    checks.append(Check("main pass sees the image", main_moved > need, main_moved, f"> {need:.1e}",
                        "replacing the pixels did not change the main side's target logits of text rows, "
                        "so the blindness checks above show nothing: check that the batch's pixels reach the model"))
    if "mask" in gaps:
        tol = 1e-4 * max(1.0, float(gaps["mask"][rows].abs().max())) * factor
        d = float((gaps["drop"] - gaps["mask"])[rows].abs().max())
        checks.append(Check("drop = mask on text rows (gaps)", d <= tol, d, f"<= {tol:.1e}",
                            "the default contrast (drop) computes other gaps than the published mask "
                            "contrast on text rows"))

    # (b) faithful mode (or, where masking is refused, the default drop) = the two-forward reference
    checks += _reference_checks(model, batch, layout, "drop" if refusal else "mask", gradients, factor)

    # (c) unit weights = the model's own loss
    with torch.no_grad(), enabling.enabled(model, CALConfig(alpha=1.0, beta=1.0)):
        unit = model(**batch)
    rel = _rel(unit.loss, own_loss)
    ones = bool(torch.all(unit.cal_weights == 1.0))
    tol = 1e-6 * factor
    checks.append(Check("unit weights = the model's own loss", rel <= tol and ones, rel, f"<= {tol:.0e} rel",
                        "with alpha = beta = 1 the CAL loss differs from the model's own loss: labels, "
                        "image positions or padding do not line up with what the model trains on"
                        if ones else "alpha = beta = 1 did not give every weight 1"))
    return checks


def _reference_checks(model, batch, layout, contrast, gradients, factor) -> list[Check]:
    from . import enabling

    cfg = CALConfig(**dict(FAITHFUL, contrast=contrast))
    what = ("faithful = two-forward reference" if contrast == "mask"
            else "drop = two-forward reference")
    grad_ctx = contextlib.nullcontext() if gradients else torch.no_grad()
    with grad_ctx:
        ref_loss, ref_gaps, ref_weights = reference_step(
            model, batch, layout.visual, cfg.alpha, cfg.beta, cfg.pool_window, contrast=contrast)
    ref_grads = {}
    if gradients:
        ref_loss.backward()
        ref_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
    with grad_ctx, enabling.enabled(model, cfg):
        out = model(**batch)
        if gradients:
            out.loss.backward()
    cal_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    checks = []
    rel, tol = _rel(out.loss, ref_loss), 1e-5 * factor
    checks.append(Check(f"{what}: loss", rel <= tol, rel, f"<= {tol:.0e} rel",
                        f"calplug's {contrast} loss differs from the reference (the model's forward, and "
                        f"a forward with the image positions {'masked' if contrast == 'mask' else 'removed'})"))
    for name, mine, ref in (("gaps", out.cal_gaps, ref_gaps), ("weights", out.cal_weights, ref_weights)):
        d = float((mine.float().reshape(-1) - ref).abs().max())
        tol = 1e-5 * max(1.0, float(ref.abs().max())) * factor
        checks.append(Check(f"{what}: {name}", d <= tol, d, f"<= {tol:.1e}",
                            f"calplug's {contrast} {name} differ from the reference's"))
    std = float(ref_weights.std())
    checks.append(Check(f"reference weights vary (alpha {cfg.alpha:g}, beta {cfg.beta:g})",
                        std > MIN_WEIGHT_STD, std, f"> {MIN_WEIGHT_STD:.0e} (std)",
                        "every reference weight is (nearly) the same: the loss comparison shows little; "
                        "use a batch whose captions depend on the image"))
    if gradients:
        worst, missing = _grad_error(cal_grads, ref_grads)
        tol = 1e-5 * factor
        checks.append(Check(f"{what}: gradients", worst <= tol and not missing, worst,
                            f"<= {tol:.0e} rel (each parameter)",
                            f"parameters with a gradient on one side only: {', '.join(missing[:3])}"
                            if missing else "a parameter's gradient differs from the reference's"))
    return checks


# -- the independent reference ---------------------------------------------------------------------
def reference_step(model: nn.Module, batch: dict, visual: torch.Tensor, alpha: float, beta: float,
                   window: int, contrast: str = "mask") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CAL loss by the two-forward definition, without calplug's step: the model's own
    forward (with grad), and a second forward (no grad) in which a pre-hook on the text decoder
    removes the image positions ``visual [B, L]``: ``contrast="mask"`` (the published one) hides
    them from every query in whatever attention mask the model built; ``"drop"`` takes them out
    of the decoder's sequence (text keeps its positions; a removed row takes the state of the
    last text position before it, as docs/cal.md defines). Full float32 logits, flat pooling.
    Whatever the model adds to its cross-entropy (a router's load-balancing loss) is kept: its own
    loss minus the plain cross-entropy of its logits. Returns ``(loss, gaps [N], weights [N])``,
    N = B * (L - 1)."""
    out = model(**batch)
    logits = _logits(out)
    decoder = text_decoder(model)
    attention = batch.get("attention_mask")
    attention = torch.ones_like(visual, dtype=torch.long) if attention is None else attention
    if contrast == "mask":
        handle = decoder.register_forward_pre_hook(_hide_positions(visual), with_kwargs=True)
        second = batch
    else:
        keep = attention.bool() & ~visual
        handle = decoder.register_forward_pre_hook(_remove_positions(keep), with_kwargs=True)
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
        logits_wo = _spread(logits_wo, keep, visual.any(1), logits.detach())
    if logits_wo.shape != logits.shape:
        raise CALInputError("the model's logits changed shape when image positions were hidden")
    labels = batch["labels"]
    V = logits.shape[-1]
    flat = logits[:, :-1].reshape(-1, V).float()
    flat_wo = logits_wo[:, :-1].reshape(-1, V).float()
    shifted = labels[:, 1:].reshape(-1)
    y = shifted.clamp(min=0)
    rows = torch.arange(y.numel(), device=y.device)
    gaps = (flat[rows, y] - flat_wo[rows, y]).detach()
    w = gaps.clamp(min=alpha, max=beta)
    if window > 1:
        w = F.avg_pool1d(w.view(1, 1, -1), kernel_size=window, stride=1, padding=window // 2,
                         count_include_pad=False).view(-1)
    ce = F.cross_entropy(flat, shifted, ignore_index=IGNORE_INDEX, reduction="none")
    valid = shifted != IGNORE_INDEX
    loss = (ce * w).sum() / (w[valid].sum() + 1e-6)
    own = _loss(out)
    if own is not None:  # what the model adds to plain cross-entropy (0 for most models)
        loss = loss + (own.float() - ce[valid].mean())
    return loss, gaps, w.detach()


def text_decoder(model: nn.Module) -> nn.Module:
    """The module the model hands its merged embeddings to: what the model's own ``get_decoder()``
    returns, looked through when that is a causal-LM wrapper (Llama 4) or holds a ``decoder``
    (OPT); where a release's class has no usable ``get_decoder()`` (one returning a module without
    decoder layers), the integration's attribute paths for that release."""
    decoder = None
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError, TypeError):
        pass
    if isinstance(decoder, nn.Module):
        if hasattr(decoder, "lm_head") and isinstance(getattr(decoder, "model", None), nn.Module):
            decoder = decoder.model
        inner = getattr(decoder, "decoder", None)
        if isinstance(inner, nn.Module) and hasattr(inner, "layers"):
            decoder = inner
        if hasattr(decoder, "layers"):
            return decoder
    from . import enabling

    integration = enabling.find_integration(model)
    if integration.decoder_and_head is None:
        raise CALInputError(f"verify cannot find the text decoder of {type(model).__name__}: its "
                            "get_decoder() returns no module with decoder layers")
    return integration.decoder_and_head(model)[0]


def _check_sequence(kwargs: dict, shape: torch.Size) -> torch.Tensor:
    embeds = kwargs.get("inputs_embeds")
    if embeds is None or embeds.shape[:2] != shape:
        raise CALInputError(
            "the text decoder did not receive inputs_embeds of the batch's [batch, seq_len] "
            f"{tuple(shape)}: verify handles models that splice image features into the input_ids "
            "sequence at placeholder tokens (transformers' VLM classes); LLaVA-codebase models are "
            "proven by calplug's own tests (tox -e llava)")
    return embeds


def _hide_positions(visual: torch.Tensor):
    """A decoder pre-hook: no query may attend to a ``visual`` key, in a 2-D padding mask (or none),
    a 4-D mask (boolean: True = attend; float: 0 = attend), or a dict of 4-D masks per layer type.
    A 4-D mask's row left with no key at all keeps its own position."""

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
        embeds = _check_sequence(kwargs, visual.shape)
        return args, dict(kwargs, attention_mask=hide(kwargs.get("attention_mask"), embeds))

    return pre_hook


def _remove_positions(keep: torch.Tensor):
    """A decoder pre-hook: the decoder runs on the ``keep [B, L]`` positions of each sample only,
    packed to the left in order (right padding), each with its original position id. Every
    ``[B, L, ...]`` input is gathered alike; a 2-D padding mask (or none) only."""
    B, L = keep.shape
    counts = keep.sum(1)
    length = max(int(counts.max()), 1)
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :length]

    def pre_hook(module, args, kwargs):
        embeds = _check_sequence(kwargs, keep.shape)
        mask = kwargs.get("attention_mask")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            raise CALInputError("the decoder received a ready-made (4-D or per-layer) attention mask, "
                                "which verify's drop reference does not rebuild")
        new = {}
        idx = order.to(embeds.device)
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == (B, L) \
                    and name != "attention_mask":
                index = idx.view(B, length, *([1] * (value.dim() - 2))).expand(B, length, *value.shape[2:])
                new[name] = value.gather(1, index)
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(L, device=embeds.device).expand(B, L)
        lead = positions.shape[:-2]
        positions = positions.expand(*lead, B, L)
        new["position_ids"] = positions.gather(-1, idx.expand(*lead, B, length))
        packed = torch.arange(length, device=embeds.device).unsqueeze(0) < counts.to(embeds.device).unsqueeze(1)
        new["attention_mask"] = packed.long() if mask is None else packed.to(mask.dtype)
        for name in ("past_key_values", "cache_position"):
            if name in kwargs:
                new[name] = None
        if "use_cache" in kwargs:
            new["use_cache"] = False
        return args, dict(kwargs, **new)

    return pre_hook


def _spread(short: torch.Tensor, keep: torch.Tensor, with_image: torch.Tensor,
            logits: torch.Tensor) -> torch.Tensor:
    """``[B, L, V]`` contrast logits from the ``[B, L', V]`` logits of the kept positions: each row
    takes the last kept position at or before it; rows with none, and samples without an image,
    take the main logits (gap 0)."""
    rank = keep.long().cumsum(1) - 1
    index = rank.clamp(min=0).unsqueeze(-1).expand(-1, -1, short.shape[-1])
    spread = short.gather(1, index.to(short.device))
    use_main = (rank < 0) | ~with_image.unsqueeze(1)
    return torch.where(use_main.unsqueeze(-1), logits, spread)


# -- helpers ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _dropout_off(model: nn.Module) -> Iterator[None]:
    """Dropout probability 0 for the block (``nn.Dropout`` modules and float ``*dropout``
    attributes that attention modules read in training), restored after."""
    changed = []
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            changed.append((module, "p", module.p))
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if name.endswith("dropout") and isinstance(value, float) and value > 0:
                changed.append((module, name, value))
                setattr(module, name, 0.0)
    try:
        yield
    finally:
        for module, name, value in changed:
            setattr(module, name, value)


def _logits(out) -> torch.Tensor:
    if isinstance(out, tuple):
        return out[1] if out[0].dim() == 0 else out[0]
    return out.logits


def _loss(out) -> torch.Tensor | None:
    if isinstance(out, tuple):
        return out[0] if out[0].dim() == 0 else None
    return out.loss


def _target_logits(out, targets: torch.Tensor) -> torch.Tensor:
    return _logits(out)[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()


def _max_diff(a, b) -> float:
    if a is None or b is None:
        return 0.0 if a is b else float("inf")
    if a.shape != b.shape:
        return float("inf")
    return float((a.float() - b.float()).abs().max())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = float(a.detach()), float(b.detach())
    return abs(a - b) / max(abs(b), 1e-30)


def _grad_error(actual: dict, expected: dict) -> tuple[float, list[str]]:
    """Largest per-parameter relative error ``||a - e|| / ||e||``, and parameters with a gradient
    on one side only. A parameter whose reference gradient is under 1e-3 of the whole gradient's
    norm is measured against that floor: gradients that are 0 in exact arithmetic (an attention
    key bias: softmax ignores a shift) hold only round-off, which has no relative size."""
    missing = sorted(set(actual) ^ set(expected))
    shared = sorted(set(actual) & set(expected))
    total = math.sqrt(sum(float(expected[n].double().norm()) ** 2 for n in shared))
    floor = max(1e-3 * total, 1e-30)
    worst = 0.0
    for name in shared:
        a, e = actual[name].double(), expected[name].double()
        worst = max(worst, float((a - e).norm()) / max(float(e.norm()), floor))
    return worst, missing


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _transformers_version() -> str:
    try:
        import transformers
    except ImportError:
        return "not installed"
    return transformers.__version__


def _support(model: nn.Module) -> tuple[str, str] | None:
    """The support matrix's status (proven / refused / matched) of the model's transformers class
    (the first in its MRO: a user's subclass counts as the class it extends)."""
    from .integrations.families import support_status

    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers."):
            return support_status(cls.__name__)
    return None
