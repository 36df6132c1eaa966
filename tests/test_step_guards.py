"""The step's guards (calplug/guards.py): packed / padding-free batches are refused at the first
step naming the options to turn off, and steps that carry images but never find an image
position are reported once."""
from __future__ import annotations

import warnings

import pytest
import torch

import calplug
from calplug import guards
from calplug.errors import CALInputError, CALWarning
from calplug.hookspecs import VISUAL_MASK_ARGUMENT
from calplug.testing import llava_batch, tiny_llava


@pytest.fixture()
def model():
    return calplug.enable(tiny_llava(seed=0).train(), alpha=0.0)


def packed(model):
    """Two samples in one row, as padding-free packing lays them out: positions restart at the
    second sample, the mask is all ones (or absent)."""
    batch = llava_batch(model, lengths=(12, 9), with_image=(True, True))
    rows = [batch["input_ids"][b][batch["attention_mask"][b].bool()] for b in range(2)]
    labels = [batch["labels"][b][batch["attention_mask"][b].bool()] for b in range(2)]
    return dict(input_ids=torch.cat(rows).unsqueeze(0), labels=torch.cat(labels).unsqueeze(0),
                attention_mask=torch.ones(1, sum(r.numel() for r in rows), dtype=torch.long),
                position_ids=torch.cat([torch.arange(r.numel()) for r in rows]).unsqueeze(0),
                pixel_values=batch["pixel_values"])


def test_positions_restarting_inside_a_row_are_refused(model):
    batch = packed(model)
    with pytest.raises(CALInputError, match=r"positions restart inside row 0 .* turn packing off "
                                            r"\(axolotl: sample_packing: false"):
        model(**batch)


def test_padded_rows_with_explicit_positions_are_not_packing(model):
    for side in ("left", "right"):
        batch = llava_batch(model, padding_side=side)
        mask = batch["attention_mask"]
        batch["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)  # what collators hand in
        assert model(**batch).loss.isfinite()


def test_block_diagonal_masks_are_refused(model):
    batch = packed(model)
    L = batch["input_ids"].shape[1]
    batch["attention_mask"] = torch.ones(1, 1, L, L)
    batch.pop("position_ids")
    with pytest.raises(CALInputError, match=r"4-D \(block-diagonal\) mask.*LLaMA-Factory: packing: "
                                            r"false, neat_packing: false"):
        model(**batch)


def test_flash_attention_boundaries_are_refused(model):
    batch = packed(model)
    batch["cu_seq_lens_q"] = torch.tensor([0, 28, 41], dtype=torch.int32)
    with pytest.raises(CALInputError, match="gives cu_seq_lens_q: several samples packed into one "
                                            "row .*TRL: padding_free=False"):
        model(**batch)


def test_mrope_restarts_only_when_every_axis_falls_back():
    mask = torch.ones(1, 8, dtype=torch.long)
    # text 0-1, a 2 x 2 image at 2 (height, width wrap row by row), text from 4 on
    one_sample = torch.tensor([[[0, 1, 2, 2, 2, 2, 4, 5]],
                               [[0, 1, 2, 2, 3, 3, 4, 5]],
                               [[0, 1, 2, 3, 2, 3, 4, 5]]])
    guards.refuse_restarting_positions(one_sample, mask)
    two_samples = torch.cat([one_sample[..., :4], torch.arange(4).view(1, 1, 4).expand(3, 1, 4)], -1)
    with pytest.raises(CALInputError, match=r"at index 4, position \[0, 0, 0\] after \[2, 2, 3\]"):
        guards.refuse_restarting_positions(two_samples, mask)
    holes = mask.clone()
    holes[0, 4] = 0  # a held-out position is skipped: index 5 is compared with index 3
    with pytest.raises(CALInputError, match=r"at index 5, position \[1, 1, 1\] after \[2, 2, 3\]"):
        guards.refuse_restarting_positions(two_samples, holes)


def embeds_without_images(model):
    """Pre-merged embeddings whose pipeline says no position is an image (while the batch was
    built with images): what a mismatched placeholder id looks like to calplug."""
    batch = llava_batch(model, with_image=(True, True, True))
    embeds = model.get_input_embeddings()(batch["input_ids"].clamp(max=200)).detach()
    return dict(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"],
                **{VISUAL_MASK_ARGUMENT: torch.zeros_like(batch["attention_mask"], dtype=torch.bool)})


def test_steps_carrying_images_without_image_positions_are_reported_once(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(guards.NO_IMAGE_STEPS + 3):
            model(**embeds_without_images(model))
            said = [w for w in caught if issubclass(w.category, CALWarning)]
            assert len(said) == (step + 1 >= guards.NO_IMAGE_STEPS), step
    (warning,) = said
    assert f"{guards.NO_IMAGE_STEPS} CAL training steps in a row on LlavaForConditionalGeneration " \
           "carried images" in str(warning.message)
    assert "CAL changed nothing" in str(warning.message)


def test_a_step_that_finds_images_starts_the_count_again(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2 * guards.NO_IMAGE_STEPS - 1):  # N - 1 blind steps either side
            if step == guards.NO_IMAGE_STEPS - 1:
                model(**llava_batch(model))  # images found: the count restarts
            else:
                model(**embeds_without_images(model))
        assert not [w for w in caught if issubclass(w.category, CALWarning)]


def test_text_only_batches_are_not_counted():
    assert not guards.carries_images({"input_ids": torch.ones(1, 3), "pixel_values": None})
    assert not guards.carries_images({"input_ids": torch.ones(1, 3), "pixel_values": torch.zeros(0, 3)})
    assert guards.carries_images({"input_ids": torch.ones(1, 3), "images": [torch.zeros(3, 2, 2)]})
    assert guards.carries_images({"inputs_embeds": torch.zeros(1, 3, 4)})
