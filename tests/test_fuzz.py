"""Property-based tests (hypothesis): random valid settings on random small batches, random
invalid settings, random YAML text and random patch paths, so the next bad input is found by the
suite rather than by a user.

Over random valid configs and batches (padding on either side, text-only samples, the image block
anywhere in the text, float32 or bfloat16, any subset of tokens supervised, none included):
* the CAL loss is finite (0 for a batch without a supervised token);
* every supervised row's weight lies in ``[alpha, beta]``;
* with unit weights (``alpha = beta = 1``) the CAL loss is the model's own loss;
* `calplug.disable` restores the model: no attribute left, the same logits as before enabling.
Over random invalid values of every setting: `CALConfigError` naming the setting, nothing else.
Over random YAML text: a `CALConfig` or a `CALConfigError`, never another exception.
Over random paths in a patch: refused, or a file inside the tree.

Example counts keep the file within seconds on a laptop CPU (the default tox env runs it).
"""
from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from _skips import importorskip

hypothesis = importorskip("hypothesis", "hypothesis", "the fuzz tests need it: pip install hypothesis "
                          "(tox -e py installs it)")
from hypothesis import HealthCheck, assume, given, settings, strategies as st  # noqa: E402

import calplug  # noqa: E402
from calplug import CALConfig, CALConfigError, plugins  # noqa: E402
from calplug.config import POOL_SCOPES, STAGES, resolve_config  # noqa: E402
from calplug.gap import IGNORE_INDEX  # noqa: E402
from calplug.testing import tiny_llava  # noqa: E402

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_MODELS: dict = {}


def model_of(dtype: torch.dtype):
    """One tiny Llava per dtype for the whole file (hypothesis examples cannot take fixtures)."""
    if dtype not in _MODELS:
        _MODELS[dtype] = tiny_llava(0).to(dtype).train()
    return _MODELS[dtype]


# -- strategies ------------------------------------------------------------------------------------
@st.composite
def valid_configs(draw) -> dict:
    # Gaps of the random-init model are about +-0.15: half the ranges are drawn at that scale,
    # so the clamp really acts on both sides.
    alpha = draw(st.one_of(st.floats(0.0, 0.1), st.floats(0.0, 4.0)))
    beta = alpha + draw(st.one_of(st.floats(0.0, 0.1), st.floats(0.0, 6.0)))
    assume(beta > 0)
    contrast = draw(st.sampled_from(["drop", "mask", "patch_mask", "blur"]))
    return dict(alpha=alpha, beta=beta, pool_window=draw(st.sampled_from([1, 3, 5, 7])),
                pool_scope=draw(st.sampled_from(POOL_SCOPES)), contrast=contrast,
                mask_ratio=draw(st.floats(0.0, 1.0)), blur_sigma=draw(st.floats(0.1, 3.0)),
                seed=draw(st.integers(0, 2 ** 63 - 1)), stages=draw(st.sampled_from(STAGES)),
                loss_chunk=draw(st.sampled_from([0, 0, 1, 7, 64])))


@st.composite
def batches(draw, model) -> dict:
    """1-3 samples; each: text with the image block (16 positions) after any number of its
    tokens, or text only; a random subset of text tokens supervised; padded left or right."""
    cfg = model.config
    image_token, n_img = cfg.image_token_index, cfg.image_seq_length
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    seqs, labs = [], []
    for _ in range(draw(st.integers(1, 3))):
        has_image = draw(st.booleans())
        n_text = draw(st.integers(1 if has_image else 2, 8))
        text = torch.randint(3, image_token - 1, (n_text,), generator=g)
        supervised = torch.tensor(draw(st.lists(st.booleans(), min_size=n_text, max_size=n_text)))
        lab = torch.where(supervised, text, torch.full_like(text, IGNORE_INDEX))
        if has_image:
            k = draw(st.integers(0, n_text))                 # the image after k text tokens
            text = torch.cat([text[:k], torch.full((n_img,), image_token), text[k:]])
            lab = torch.cat([lab[:k], torch.full((n_img,), IGNORE_INDEX), lab[k:]])
        seqs.append(text)
        labs.append(lab)
    left = draw(st.booleans())
    B, L = len(seqs), max(s.numel() for s in seqs)
    input_ids = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, (s, lab) in enumerate(zip(seqs, labs)):
        sl = slice(L - s.numel(), L) if left else slice(0, s.numel())
        input_ids[b, sl], labels[b, sl], mask[b, sl] = s, lab, 1
    n_images = int((input_ids == image_token).sum()) // n_img
    vc = cfg.vision_config
    pixels = torch.randn(n_images, 3, vc.image_size, vc.image_size, generator=g).to(model.dtype)
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels,
                pixel_values=pixels if n_images else None)


@st.composite
def model_and_batch(draw):
    model = model_of(draw(st.sampled_from([torch.float32, torch.bfloat16])))
    return model, draw(batches(model))


# -- valid configs on random batches ---------------------------------------------------------------
def _plain_logits(model, batch) -> torch.Tensor:
    model.eval()
    try:
        with torch.no_grad():
            return model(**batch).logits
    finally:
        model.train()


@FAST
@given(case=model_and_batch(), config=valid_configs())
def test_random_configs_and_batches_give_finite_losses_and_bounded_weights(case, config):
    model, batch = case
    before = _plain_logits(model, batch)
    supervised = batch["labels"][:, 1:] != IGNORE_INDEX
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", calplug.CALWarning)   # no supervised token: warned once
        with calplug.enabled(model, **config):
            torch.manual_seed(0)
            out = model(**batch)
            out.loss.backward()
        with calplug.enabled(model, **dict(config, alpha=1.0, beta=1.0)):
            unit = model(**batch).loss.detach()
    own = model(**batch).loss.detach()
    model.zero_grad(set_to_none=True)
    assert torch.isfinite(out.loss)
    w = out.cal_weights[supervised]
    tol = 1e-5 * max(1.0, config["beta"])
    assert bool((w >= config["alpha"] - tol).all()) and bool((w <= config["beta"] + tol).all())
    if supervised.any():
        rtol = 1e-5 if model.dtype == torch.float32 else 2e-2
        assert float(unit) == pytest.approx(float(own), rel=rtol, abs=rtol)
    else:
        assert float(out.loss.detach()) == 0.0 and math.isnan(float(own))
    assert "forward" not in model.__dict__ and not calplug.is_enabled(model)
    assert torch.equal(_plain_logits(model, batch), before)


# -- invalid configs --------------------------------------------------------------------------------
NOT_NUMBERS = st.sampled_from([None, "1.0", "one", [1.0], {"x": 1}, True, False])
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
INVALID = {
    "alpha": st.one_of(NOT_NUMBERS, NON_FINITE, st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False),
                       st.floats(5.0 + 1e-6, 1e6)),                 # above the default beta = 5
    "beta": st.one_of(NOT_NUMBERS, NON_FINITE, st.floats(-1e6, 1.0 - 1e-6)),   # below the default alpha = 1
    "pool_window": st.one_of(NOT_NUMBERS, st.integers(max_value=0), st.integers(1, 1000).map(lambda n: 2 * n),
                             st.floats(1.0, 9.0)),
    "pool_scope": st.one_of(NOT_NUMBERS, st.text(max_size=12).filter(lambda s: s not in POOL_SCOPES)),
    "contrast": st.sampled_from([None, [1.0], {"x": 1}, True, False, ""]),  # names: at enable (below)
    "mask_ratio": st.one_of(NOT_NUMBERS, NON_FINITE, st.floats(-1e6, -1e-9), st.floats(1.0 + 1e-9, 1e6)),
    "blur_sigma": st.one_of(NOT_NUMBERS, NON_FINITE, st.floats(-1e6, 0.0)),
    "seed": st.one_of(NOT_NUMBERS, st.integers(max_value=-1), st.integers(min_value=2 ** 63), st.floats(0, 10)),
    "stages": st.one_of(NOT_NUMBERS, st.text(max_size=12).filter(lambda s: s not in STAGES)),
    "loss_chunk": st.one_of(NOT_NUMBERS, st.integers(max_value=-1), st.floats(0, 10)),
}


@FAST
@given(data=st.data(), key=st.sampled_from(sorted(INVALID)))
def test_every_invalid_config_raises_a_config_error_naming_the_setting(data, key):
    value = data.draw(INVALID[key])
    with pytest.raises(CALConfigError) as error:
        CALConfig(**{key: value})
    assert key in str(error.value)
    with pytest.raises(CALConfigError):                 # the same through enable's route
        resolve_config({key: value})


@FAST
@given(name=st.text(max_size=12).filter(lambda s: s not in ("drop", "mask", "patch_mask", "blur")))
def test_every_unregistered_contrast_name_is_refused_when_resolved(name):
    """A config holds any contrast name (plugins may register more later); `calplug.enable`
    resolves it once, and an unregistered one is a config error naming the registered ones."""
    with pytest.raises(CALConfigError, match="contrast .* registered contrast.*Registered: blur, drop"):
        plugins.resolve_contrast(name)


@FAST
@given(text=st.text(max_size=80) | st.sampled_from(["alpha: [1", "cal: {", "beta: !!python/name:os.system",
                                                    "\t alpha: 1", "alpha: 1\nalpha: 2", "cal:\n- 1"]))
def test_random_yaml_text_gives_a_config_or_a_config_error(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cal.yaml"
        path.write_bytes(text.encode("utf-8", errors="replace"))   # lone surrogates become '?'
        try:
            cfg = resolve_config(path)
        except CALConfigError as error:
            assert str(path) in str(error)
        else:
            assert isinstance(cfg, CALConfig)


# -- patch paths --------------------------------------------------------------------------------------
PARTS = st.sampled_from(["..", ".", "a", "b", "link", "inside", "", "x.txt", "/", "~", "..."])


@FAST
@given(parts=st.lists(PARTS, min_size=1, max_size=5), absolute=st.booleans())
def test_random_patch_paths_are_refused_or_inside_the_tree(parts, absolute):
    from calplug import patching

    with tempfile.TemporaryDirectory() as folder:
        top = Path(folder)
        root, outside = top / "tree", top / "outside"
        (root / "inside").mkdir(parents=True)
        outside.mkdir()
        (root / "link").symlink_to(outside)
        rel = ("/" if absolute else "") + "/".join(parts)
        fake = patching.PatchFile("fuzz", top / "fuzz.patch", {}, [patching.FileDiff(rel, [])])
        try:
            (target,) = patching.targets(fake, root)
        except patching.PatchError as error:
            assert "refusing fuzz" in str(error) and "Nothing was changed" in str(error)
        else:
            assert target.resolve().is_relative_to(root.resolve())
            assert not any(p.is_symlink() for p in [target, *target.parents] if p.is_relative_to(root))
