"""`calplug.verify(model, batch)`: the checks of calplug's family tests, run on your own model.

calplug proves each transformers family it integrates on tiny seeded models (tests/cases.py,
tests/test_properties.py). A model whose class the integration matches but whose family has no
proof there, or a checkpoint with a configuration the tiny models do not have, can be checked
here, on the model itself and one of its training batches:

(0) **the image positions cover where the pixels enter**: every position whose text-decoder input
    changes when the pixels are replaced is one the integration reports (measured without the
    integration);
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
(d) **disable restores** the forward: outputs bit-identical to before ``enable``;
(e) **the model's logits are what the contrast side computes** (the self-check every enabled
    model runs at its first training step): at a few supervised rows, the model's own logit
    equals ``hidden . W[y] + b`` of the same final hidden states, then the integration's logit
    transform (a forward that scales or caps its logits in a way calplug does not know fails it).

For a model whose image is not at positions of its decoder sequence (cross-attention states, an
encoder's output), the integration's `Integration.reference_pass` says how the reference takes it
out; check (0) then asks that every sample whose logits move with the pixels is one the
integration says has an image, and the checks read every non-padding row of those samples.

The model is left as it was found: enabled state and config, train/eval mode, gradients.
Dropout is switched off for the checks (two forwards must see the same network).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from torch import nn

from . import contrast_pass, enabling, scoring
from .config import CALConfig
from .errors import CALInputError
from .gap import IGNORE_INDEX, shift_targets
from .hookspecs import ReferencePass
from .inputs import PATCH_ARGUMENTS, PIXEL_PREFIX, pixel_keys as float_pixel_keys
from .reference import _logits, _loss, pixel_positions, pixel_samples, reference_image_free_step, reference_step

POSITIONS_CHECK = "image positions cover where the pixels enter"
SAMPLES_CHECK = "image samples cover where the pixels enter"
FAITHFUL = dict(contrast="mask", pool_scope="flat", alpha=0.0, beta=5.0, pool_window=3,
                check_logits=False)
# The checks below enable the model with the self-check off: it is check (e), reported as a row
# rather than raised from inside another check.
UNCHECKED = dict(check_logits=False)
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
    """Run checks (0)-(d) of this module's docstring on ``model`` and one training ``batch``
    (the keyword arguments of its forward, ``labels`` included, ``[B, L]`` aligned with
    ``input_ids``; at least one sample with an image). ``gradients=False`` skips the gradient
    comparison (one backward pass fewer, no second set of gradients in memory). Returns a `Report`;
    raises `CALInputError` for a batch it cannot check and `UnsupportedModelError` for a model
    calplug cannot enable."""
    from .step import STATE_ATTR

    target = enabling.unwrap_model(model)
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
        with scoring.dropout_off(target):
            layout = _layout(target, batch, seed)
            checks = _run_checks(target, batch, layout, integration, gradients)
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
    support = integration.support_status(target) if integration.support_status is not None else None
    return Report(type(target).__name__, setting, checks, support, notes)


def _mask_refusal(model: nn.Module, integration) -> str | None:
    """Why the integration refuses the published mask contrast for this model (None: it does not)."""
    if integration.contrast_refusal is None:
        return None
    return integration.contrast_refusal(model, "mask")


# -- layout of the batch --------------------------------------------------------------------------
@dataclasses.dataclass
class _Layout:
    labels: torch.Tensor      # [B, L] labels of the decoder sequence calplug runs (the main pass's)
    visual: torch.Tensor      # bool [B, L]: the image positions the integration reports
    measured: torch.Tensor    # bool [B, L] (or [B]): where (which samples) the pixels reach (measured)
    with_image: torch.Tensor  # bool [B]: the samples the image reaches
    attention: torch.Tensor   # [B, L] padding mask of that sequence
    replaced: dict            # the batch with other pixels of the same shape
    decoder: nn.Module        # the module the model hands its merged embeddings to
    positions: torch.Tensor | None = None  # the main pass's numbering, for a decoder handed none
    reference: ReferencePass | None = None  # how the reference takes out an image held elsewhere

    @property
    def text_rows(self) -> torch.Tensor:
        """bool ``[B, L-1]``: shifted rows at text (not image, not padding) positions of samples
        with an image: where the contrast side must not see the image, and drop must equal mask."""
        text = self.attention.bool() & ~self.visual & self.with_image.unsqueeze(1)
        return text[:, :-1]


def _layout(model: nn.Module, batch: dict, seed: int) -> _Layout:
    """The batch checked, and where its images are, twice: as the integration reports them (its
    main pass, no grad: what the training step and the reference use) and as measured without it
    (the positions whose decoder input changes with the pixels, `calplug.reference.pixel_positions`)."""
    if not isinstance(batch, dict):
        raise CALInputError(f"verify takes the batch as a dict of forward arguments, got {type(batch).__name__}")
    input_ids, labels = batch.get("input_ids"), batch.get("labels")
    if not isinstance(input_ids, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise CALInputError("verify needs a training batch with input_ids and labels (the forward's "
                            "keyword arguments, as the trainer passes them)")
    if labels.dim() != 2 or labels.shape[0] != input_ids.shape[0]:
        raise CALInputError(f"labels {tuple(labels.shape)} must be [batch, seq_len] for the input_ids "
                            f"{tuple(input_ids.shape)}")
    if not bool((labels[:, 1:] != IGNORE_INDEX).any()):
        raise CALInputError("every label of the batch is -100: verify needs supervised tokens")
    pixel_keys = float_pixel_keys(batch)
    if not pixel_keys:
        raise CALInputError(f"the batch has no {PIXEL_PREFIX}* (or {', '.join(PATCH_ARGUMENTS)}) "
                            "tensor: verify needs a batch with at "
                            "least one image, with the processor's pixel values")
    target, _, integration, _, forward = scoring.resolved(model, CALConfig())
    own = integration.decoder_and_head(target)[0] if integration.decoder_and_head else None
    with torch.no_grad(), _received_positions(own) as received:
        main = scoring.main_pass(target, integration, forward, batch)
    reference = (integration.reference_pass(target, batch)
                 if integration.reference_pass is not None else None)
    if reference is None and main.labels.shape != labels.shape:
        raise CALInputError(
            "the model's decoder sequence is not the input_ids sequence: verify handles models that "
            "splice image features into the input_ids sequence at placeholder tokens "
            "(transformers' VLM classes); LLaVA-codebase models are proven by calplug's own tests "
            "(tox -e llava)")
    g = torch.Generator().manual_seed(seed)
    replaced = dict(batch, **{k: _replace_pixels(batch[k], g) for k in pixel_keys})
    # the model's own decoder module (the main pass may hand the contrast pass a wrapper of it)
    decoder = own if own is not None else main.decoder
    # a decoder handed no position ids numbers them itself (OPT: from the mask); the integration's
    # numbering of the main pass goes to the reference, which checks it is the model's own
    positions = (main.position_ids if received and received[0] is None
                 and main.decoder_kwargs.get("position_ids") is not None else None)
    if not bool(main.with_image.any()):
        raise CALInputError("calplug found no image in the batch (no image placeholder in input_ids, "
                            "or placeholder ids that are not the model config's): verify needs a "
                            "batch with at least one image")
    if reference is None:
        measured = pixel_positions(target, batch, replaced, decoder=decoder)
    else:  # the image enters elsewhere (cross-attention states, an encoder): which samples it reaches
        measured = pixel_samples(target, batch, replaced)
    return _Layout(main.labels, main.visual_mask, measured, main.with_image, main.attention_mask,
                   replaced, decoder, positions=positions, reference=reference)


@contextlib.contextmanager
def _received_positions(decoder: nn.Module | None):
    """The ``position_ids`` the decoder's first call inside the block received (a list of one)."""
    received: list = []
    if decoder is None:
        yield received
        return

    def hook(module, args, kwargs):
        if not received:
            received.append(kwargs.get("position_ids"))

    handle = decoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield received
    finally:
        handle.remove()


def _replace_pixels(value, g: torch.Generator):
    """Other pixels of the same layout: seeded noise at the scale of the originals. All-zero
    entries stay zero (Idefics-type processors mark padding images that way), and so do columns
    of the last axis that hold only whole numbers, not all the same, while others do not: the
    row and column index in front of each flattened patch (Kosmos-2.5's ``flattened_patches``),
    which are positions, not pixels. A tensor of whole numbers only (unnormalised pixels) is
    replaced whole."""
    if isinstance(value, (list, tuple)):
        return type(value)(_replace_pixels(v, g) for v in value)
    if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
        return value
    x = value.float()
    columns = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(-1, 1)
    # index columns: whole numbers that vary (a constant column, e.g. a black border, is pixels)
    whole = (columns == columns.round()).all(0) & (columns.amax(0) > columns.amin(0))
    if bool(whole.all()) or x.dim() == 1:
        whole = torch.zeros_like(whole)
    whole = whole.to(x.device)
    picked = x[..., ~whole] if x.dim() > 1 else x   # the statistics of the pixel columns
    noise = torch.randn(x.shape, generator=g) * picked.std().clamp(min=1e-3).cpu() + picked.mean().cpu()
    return torch.where((x == 0) | whole, x, noise.to(x.device)).to(value.dtype)


# -- the checks -----------------------------------------------------------------------------------
def _run_checks(model, batch, layout: _Layout, integration, gradients: bool) -> list[Check]:
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
        enabling.enable(model, CALConfig(**UNCHECKED))
        model(**batch)
        enabling.disable(model)
        after = model(**batch)
    own_loss = _loss(before)
    diff = max(_max_diff(_logits(before), _logits(after)), _max_diff(own_loss, _loss(after)))
    restored = diff == 0 and ("forward" in model.__dict__) == had_forward
    checks.append(Check("disable restores the forward (bit-identical)", restored, diff, "= 0",
                        "outputs after enable + disable differ from before" if diff
                        else "the instance's forward attribute was not restored"))

    # (e) the model's logits = the contrast side's target logits of the same hidden states
    checks.append(_head_check(model, batch, integration))

    # (0) the integration's image positions (samples) cover every position (sample) the pixels reach
    if layout.reference is None:
        missed = int((layout.measured & ~layout.visual).sum())
        checks.append(Check(POSITIONS_CHECK, missed == 0, float(missed),
                            "= 0", "the decoder input changes with the pixels at positions the "
                            "integration does not report as image positions"))
    else:
        missed = int((layout.measured & ~layout.with_image.to(layout.measured.device)).sum())
        checks.append(Check(SAMPLES_CHECK, missed == 0, float(missed), "= 0",
                            "the logits of samples the integration reports without an image change "
                            "with the pixels"))

    # (a) the contrast side blind to the image, the main side not; drop = mask on text rows
    replaced = layout.replaced
    prefix = layout.reference.prefix if layout.reference is not None else 0  # GIT's image rows
    gaps, main_moved, blind_tol = {}, 0.0, 0.0
    for contrast in contrasts:
        with torch.no_grad(), enabling.enabled(model, CALConfig(contrast=contrast, **UNCHECKED)):
            out, out_replaced = model(**batch), model(**replaced)
        main, main_replaced = _target_logits(out, targets, prefix), _target_logits(out_replaced, targets, prefix)
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
    with torch.no_grad(), enabling.enabled(model, CALConfig(alpha=1.0, beta=1.0, **UNCHECKED)):
        unit = model(**batch)
    rel = _rel(unit.loss, own_loss)
    ones = bool(torch.all(unit.cal_weights == 1.0))
    tol = 1e-6 * factor
    checks.append(Check("unit weights = the model's own loss", rel <= tol and ones, rel, f"<= {tol:.0e} rel",
                        "with alpha = beta = 1 the CAL loss differs from the model's own loss: labels, "
                        "image positions or padding do not line up with what the model trains on"
                        if ones else "alpha = beta = 1 did not give every weight 1"))
    return checks


def _head_check(model, batch, integration) -> Check:
    """Check (e): `calplug.contrast_pass.head_check` on one main pass of ``batch``."""
    name = "model logits = lm_head(hidden) + declared transform"
    if integration.decoder_and_head is None:
        return Check(name, False, float("nan"), "-", f"integration {integration.name!r} does not say "
                     "where the output projection is (Integration.decoder_and_head)")
    target, _, _, _, forward = scoring.resolved(model, CALConfig(**UNCHECKED))
    decoder, head = integration.decoder_and_head(target)
    with torch.no_grad(), contrast_pass.record_head_input(head, decoder) as rec:
        main = scoring.main_pass(target, integration, forward, batch)
    if rec.get("hidden") is None:
        return Check(name, False, float("nan"), "-", "the forward never called its output projection")
    _, targets, supervised = shift_targets(main.labels)
    found = contrast_pass.head_check(main, contrast_pass.checked_states(rec, main), targets, supervised)
    if found.skipped:
        return Check(name, False, float("nan"), "-", found.skipped)
    return Check(name, found.passed, found.difference, f"<= {found.tolerance:.1e}",
                 contrast_pass.head_mismatch_message(target, main, found))


def _reference_checks(model, batch, layout, contrast, gradients, factor) -> list[Check]:
    cfg = CALConfig(**dict(FAITHFUL, contrast=contrast))
    what = ("faithful = two-forward reference" if contrast == "mask"
            else "drop = two-forward reference")
    grad_ctx = contextlib.nullcontext() if gradients else torch.no_grad()
    with grad_ctx:
        if layout.reference is None:
            ref_loss, ref_gaps, ref_weights = reference_step(
                model, batch, layout.visual, cfg.alpha, cfg.beta, cfg.pool_window, contrast=contrast,
                decoder=layout.decoder, positions=layout.positions)
        else:  # the image held elsewhere: the model's own forward without it (either contrast)
            ref = layout.reference
            ref_loss, ref_gaps, ref_weights = reference_image_free_step(
                model, batch, ref.batch, ref.with_image, cfg.alpha, cfg.beta, cfg.pool_window,
                hooks=ref.hooks, shift=ref.label_shift, prefix=ref.prefix)
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


# -- helpers ----------------------------------------------------------------------------------------
def _target_logits(out, targets: torch.Tensor, prefix: int = 0) -> torch.Tensor:
    """float32 target logit of each row; row i of the output's logits (after ``prefix`` rows the
    model puts in front of the text: GIT's image) predicts ``targets[:, i]`` (a causal LM's logits
    have one row more than its shifted targets; a sequence-to-sequence model's as many)."""
    logits = _logits(out)[:, prefix:prefix + targets.shape[1]]
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()


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

