"""The paper's ablations as settings: patch masking, blur, clamp range, pooling (docs/ablations.md)."""
import pytest
import torch

import calplug
from calplug.blur import gaussian_blur
from calplug.reference import reference_blur
from calplug.testing import llava_batch
from _ablation_refs import blur_forwards, check_against, hidden_positions, patch_mask_forwards
from cases import POOLED, SETTING, hf_decoder, hf_layout


def deltas(model, batch, **cfg):
    calplug.enable(model, **cfg)
    try:
        with torch.no_grad():
            return model(**batch).cal_gaps
    finally:
        calplug.disable(model)


def test_patch_mask_ratio_zero_is_no_contrast_and_one_is_mask(model):
    batch = llava_batch(model)
    assert torch.all(deltas(model, batch, contrast="patch_mask", mask_ratio=0.0) == 0)
    full = deltas(model, batch, contrast="mask")
    torch.testing.assert_close(deltas(model, batch, contrast="patch_mask", mask_ratio=1.0), full)


@pytest.mark.parametrize("ratio, seed", [(0.5, 0), (0.7, 3)])
def test_patch_mask_equals_the_mask_reference_over_the_seeded_positions(model, ratio, seed):
    """Masking a share of the image positions is the published mask contrast over the positions
    docs/ablations.md's rule picks (seeded): loss, gaps, weights and every gradient equal the
    two-forward reference that hides exactly those, at alpha 0 and at alpha 1 with pooling."""
    batch = llava_batch(model)
    visual = hf_layout(model, batch).visual
    hidden = hidden_positions(visual, ratio, seed)
    assert 0 < int(hidden.sum()) < int(visual.sum())
    forwards = patch_mask_forwards(model, batch, visual, ratio, seed, hf_decoder(model))
    for setting in (SETTING, POOLED):
        gaps = check_against(model, batch, forwards, setting, contrast="patch_mask",
                             mask_ratio=ratio, seed=seed)
    assert gaps[0].abs().max() > 1e-3 and torch.all(gaps[2] == 0)
    # another seed hides other positions, and gets other gaps
    other = deltas(model, batch, contrast="patch_mask", mask_ratio=ratio, seed=seed + 1)
    assert not torch.allclose(other, gaps, atol=1e-4)


def test_patch_mask_is_seeded(model):
    batch = llava_batch(model)
    a = deltas(model, batch, contrast="patch_mask", mask_ratio=0.7, seed=3)
    b = deltas(model, batch, contrast="patch_mask", mask_ratio=0.7, seed=3)
    c = deltas(model, batch, contrast="patch_mask", mask_ratio=0.7, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("sigma", [1.0, 10.0])
def test_blur_equals_the_model_on_blurred_pixels(model, sigma):
    """The blur contrast is the model's own whole forward on blurred pixels: loss, gaps, weights
    and every gradient equal the reference that blurs the pixels by the definition
    (`calplug.reference.reference_blur`) and runs the model on them, at alpha 0 and at alpha 1
    with pooling. The text-only sample gets no contrast."""
    batch = llava_batch(model)
    forwards = blur_forwards(model, batch, sigma, ("pixel_values",))
    for setting in (SETTING, POOLED):
        gaps = check_against(model, batch, forwards, setting, contrast="blur", blur_sigma=sigma)
    assert gaps[0].abs().max() > 1e-3 and torch.all(gaps[2] == 0)


def test_blur_with_a_tiny_sigma_changes_nothing(model):
    batch = llava_batch(model)
    assert deltas(model, batch, contrast="blur", blur_sigma=1e-3).abs().max() < 1e-6


@pytest.mark.parametrize("sigma, size", [(1e-3, 8), (1.0, 16), (2.0, 16), (10.0, 16), (10.0, 32)])
def test_gaussian_blur_equals_the_reference_blur(sigma, size):
    """calplug's separable convolution equals the definition written as blur matrices (a kernel
    wider than the image clipped: sigma 10 on 16 pixels); it keeps a constant image and smooths
    noise."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, size, generator=g)
    torch.testing.assert_close(gaussian_blur(x, sigma), reference_blur(x, sigma), rtol=1e-5, atol=1e-6)
    if sigma >= 1.0:
        assert gaussian_blur(x, sigma).std() < 0.5 * x.std()
    torch.testing.assert_close(gaussian_blur(torch.full((1, 3, 8, 8), 0.7), sigma),
                               torch.full((1, 3, 8, 8), 0.7))


def test_blur_on_an_integration_without_pixels_is_refused(model):
    from calplug import plugins
    from calplug.hookspecs import Integration

    class Fake(torch.nn.Module):
        pass

    fake_integration = Integration(name="fake", model_classes=("Fake",), main_pass=lambda *a: None)

    class FakePlugin:
        @calplug.hookimpl
        def calplug_integrations(self):
            return [fake_integration]

    plugins.register(FakePlugin(), name="test-fake-integration")
    try:
        with pytest.raises(calplug.UnsupportedModelError, match=r"blur.*LlavaForConditionalGeneration"):
            calplug.enable(Fake(), contrast="blur")
        calplug.enable(model, contrast="blur")  # Llava can
        calplug.disable(model)
    finally:
        plugins.unregister(name="test-fake-integration")


@pytest.mark.parametrize("alpha, beta", [(1.0, 5.0), (0.0, 2.0), (2.0, 2.0)])
def test_clamp_range_bounds_every_weight(model, alpha, beta):
    batch = llava_batch(model)
    calplug.enable(model, contrast="mask", alpha=alpha, beta=beta, pool_window=1)
    out = model(**batch)
    calplug.disable(model)
    assert out.cal_weights.min() >= alpha and out.cal_weights.max() <= beta


@pytest.mark.parametrize("stages, pretrain, finetune", [
    ("both", True, True), ("pretrain", True, False), ("finetune", False, True)])
def test_stage_control(model, stages, pretrain, finetune):
    assert calplug.enable_for_stage(model, "pretrain", stages=stages) is pretrain
    assert calplug.is_enabled(model) is pretrain
    assert calplug.enable_for_stage(model, "finetune", stages=stages) is finetune
    assert calplug.is_enabled(model) is finetune
    calplug.disable(model)


def test_stage_errors():
    with pytest.raises(calplug.CALConfigError, match=r"stages.*Did you mean 'pretrain'"):
        calplug.CALConfig(stages="pretrian")
    with pytest.raises(calplug.CALConfigError, match="training stage"):
        calplug.CALConfig().covers_stage("sft")


def test_docs_other_image_contrast_example(model):
    """The third-party contrast of docs/ablations.md works as written."""
    from calplug import plugins
    from calplug.contrast import base_decoder_kwargs, identity_rows
    from calplug.hookspecs import Contrast, ContrastPlan

    class OtherImage:
        @calplug.hookimpl
        def calplug_contrasts(self):
            def other_image(main, config):
                visual = main.visual_mask
                if not visual.any():
                    return None
                kwargs = base_decoder_kwargs(main)
                kwargs.update(main.rerun_with_pixels(lambda px: px.roll(1, dims=0)))
                rows = identity_rows(*visual.shape, visual.device)
                rows[~visual.any(1)] = -1
                return ContrastPlan(kwargs, rows)
            return [Contrast("other_image", other_image, needs_pixels=True)]

    plugins.register(OtherImage(), name="test-other-image")
    try:
        batch = llava_batch(model)
        swapped = deltas(model, batch, contrast="other_image")
        mask = deltas(model, batch, contrast="mask")
    finally:
        plugins.unregister(name="test-other-image")
    assert swapped[:2].abs().sum() > 0 and torch.all(swapped[2] == 0)
    assert not torch.allclose(swapped, mask)


def simulate_sharded_ranks(monkeypatch, other_rank_has_images: bool) -> list:
    """Make calplug act as one rank of a sharded (ZeRO-3) job whose other rank does or does not
    have images: `must_agree` is True, and the agreement ORs in the other rank's flags. Returns
    the list of flag vectors this rank offered."""
    from calplug import distributed

    offered: list = []

    def any_rank_each(flags, model):
        offered.append(list(flags))
        return [flags[0] or other_rank_has_images, flags[1]]

    monkeypatch.setattr(distributed, "must_agree", lambda model: True)
    monkeypatch.setattr(distributed, "any_rank_each", any_rank_each)
    return offered


def test_blur_on_a_sharded_rank_with_images_is_unchanged_by_the_agreement(model, monkeypatch):
    batch = llava_batch(model)
    alone = deltas(model, batch, contrast="blur", blur_sigma=10.0)
    offered = simulate_sharded_ranks(monkeypatch, other_rank_has_images=False)
    agreed = deltas(model, batch, contrast="blur", blur_sigma=10.0)
    assert offered == [[True, False]]  # has image positions, has pixels to re-run
    torch.testing.assert_close(agreed, alone, rtol=0, atol=0)


def test_blur_on_a_sharded_rank_without_pixels_stops_with_the_fix(model, monkeypatch):
    """Another rank blurs (so runs the vision tower again); this rank has no pixels, so it cannot
    run the same modules: every rank raises the same error instead of hanging in a gather."""
    batch = llava_batch(model, with_image=(False, False, False))
    offered = simulate_sharded_ranks(monkeypatch, other_rank_has_images=True)
    with pytest.raises(calplug.CALInputError, match=r"no pixel values.*dummy image.*'drop'"):
        deltas(model, batch, contrast="blur")
    assert offered == [[False, True]]
    # With no rank holding images there is nothing to contrast and nothing to agree on.
    offered = simulate_sharded_ranks(monkeypatch, other_rank_has_images=False)
    assert torch.count_nonzero(deltas(model, batch, contrast="blur")) == 0
