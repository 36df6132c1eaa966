"""Contrastive decoding (`calplug.contrastive_generate`, docs/decoding.md) on every family case of
tests/cases.py that generates, against a reference written here:

* greedy decoding equals the rule recomputed from scratch at every step: both branches are the
  model's own forward on the whole sequence so far, the image-blind one through the independent
  reference's decoder hook (`calplug.reference.mask_image_hook`, or `remove_image_hook` where mask
  holes are not honoured), with no cache; tokens equal, scores close;
* ``cd_alpha=0`` gives exactly ``model.generate``'s tokens, alone and in a padded batch;
* a left-padded batch of two equals each row run alone;
* inside ``generate`` (the logits processor of `calplug.contrastive_decoding`) equals
  `contrastive_generate`.

A few new tokens on tiny models keep it quick.
"""
from __future__ import annotations

import math

import pytest
import torch

import _hf_families as hf
import calplug
from calplug.reference import mask_image_hook, remove_image_hook
from cases import CASES, params
from _skips import skip_unrunnable_family

NEW = 4
# family -> (the releases before this one, why the from-scratch reference cannot run there)
NO_REFERENCE_BELOW = {
    "paligemma": ((5, 0), "transformers < 5.0's PaliGemma, called without labels, attends "
                  "bidirectionally over the whole sequence (its inference prefix-LM mask), so a "
                  "from-scratch forward lets earlier tokens see the generated ones, which its own "
                  "cached generate() does not; cd_alpha=0 and the padded-batch test cover it here"),
}
# family -> what calplug's refusal says: families whose generate() calplug cannot decode
# contrastively (each raises UnsupportedModelError naming the class and why; nothing is returned)
NOT_DECODED = {
    "blip_2": "never called its own forward",  # generate() hands embeddings to the LM's generate()
    "instructblip": "never called its own forward",
    "instructblipvideo": "never called its own forward",
    "chameleon": "received no inputs_embeds at a decoding step",  # its decoder embeds token ids
    "ovis2_5": "neither position_ids nor cache_position",  # generate() drops the position ids
    "hyperclovax_vision_v2": "neither position_ids nor cache_position",  # same
    "janus": "never called the logits processor",  # Janus' generate drops logits_processor
}
# family -> why its own cached generate() is not its from-scratch forward (an upstream property the
# greedy reference, which recomputes without a cache, cannot be compared with)
CACHED_NOT_FROM_SCRATCH = {
    "hyv4vl": ("transformers 5.25.0's HYV4VLForConditionalGeneration: once its sparse-attention "
               "indexer keeps fewer keys than the sequence has, its own cached generate() scores "
               "differ from its forward on the whole sequence by ~1e-3 (calplug not involved); "
               "cd_alpha=0, the padded-batch and the join tests cover it"),
}
# Families whose cache the joined step cannot take (calplug/decoding_cache.py): two passes.
UNJOINED = {
    "glm5_next": "sparse-attention indexer",  # DSA: pooled, ranked indexer keys
    "mistral_large4": "sparse-attention indexer",  # the same indexer
    "hyv4vl": "sparse-attention indexer",
    "qwen4_exp": "sparse-attention indexer",
}
DECODING = [c for c in CASES if c.decode_inputs is not None]


def built(case, env):
    model, _ = case.build(env)
    return model.eval()


def refused(case, model) -> bool:
    """For a family of NOT_DECODED: contrastive decoding refuses it, naming the class and why."""
    reason = NOT_DECODED.get(case.id.split("-")[1])
    if reason is None:
        return False
    with pytest.raises(calplug.UnsupportedModelError, match=reason) as raised:
        calplug.contrastive_generate(model, max_new_tokens=NEW, **case.decode_inputs(model, (6,), (0,)))
    assert type(model).__name__ in str(raised.value)
    return True


def eos_ids(model) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    return set() if eos is None else {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


def grown(inputs: dict, token: torch.Tensor) -> dict:
    """``inputs`` with one more token per row, the per-token inputs extended as generate() extends
    them (token types repeat their last value, multimodal token types are 0: text)."""
    out = dict(inputs, input_ids=torch.cat([inputs["input_ids"], token[:, None]], 1))
    if inputs.get("attention_mask") is not None:
        mask = inputs["attention_mask"]
        out["attention_mask"] = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    if inputs.get("token_type_ids") is not None:
        types = inputs["token_type_ids"]
        out["token_type_ids"] = torch.cat([types, types[:, -1:]], 1)
    if inputs.get("mm_token_type_ids") is not None:
        types = inputs["mm_token_type_ids"]
        out["mm_token_type_ids"] = torch.cat([types, torch.zeros_like(types[:, :1])], 1)
    return out


@torch.no_grad()
def reference_decode(case, model, inputs, cd_alpha=1.0, cd_beta=0.1, steps=NEW):
    """Greedy contrastive decoding by its definition, no cache: per step the model's forward on the
    whole sequence (z at the last position) and again with the image taken out of what its text
    decoder receives (z'). Returns the new tokens, the scores, and the largest |z - z'|."""
    decoder = case.decoder(model)
    tokens, scores, largest, cutoffs, zs = [], [], 0.0, [], []
    for _ in range(steps):
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        visual = case.layout(model, dict(inputs, labels=torch.full_like(ids, -100))).visual
        z = model(**inputs, use_cache=False).logits[:, -1].float()
        if case.contrast == "drop":
            keep = mask.bool() & ~visual
            hook = remove_image_hook(keep)
        else:
            hook = mask_image_hook(visual)
        handle = decoder.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            blind = model(**inputs, use_cache=False).logits.float()
        finally:
            handle.remove()
        if case.contrast == "drop":
            blind = blind[torch.arange(ids.shape[0]), keep.sum(1) - 1]
        else:
            blind = blind[:, -1]
        with_image = visual.any(1, keepdim=True)
        z_blind = torch.where(with_image, blind, z)
        largest = max(largest, float((z - z_blind).abs().max()))
        score = (1 + cd_alpha) * z - cd_alpha * z_blind
        cutoff = math.log(cd_beta) + z.max(-1, keepdim=True).values
        score = score.masked_fill(z < cutoff, -math.inf)
        token = score.argmax(-1)
        tokens.append(token)
        scores.append(score)
        cutoffs.append(cutoff)
        zs.append(z)
        inputs = grown(inputs, token)
        if ids.shape[0] == 1 and int(token) in eos_ids(model):
            break
    return torch.stack(tokens, 1), scores, largest, zs, cutoffs


@torch.no_grad()
def generate_round_off(model, inputs) -> float:
    """How far generate()'s own first logits are from the model's forward on the same prompt:
    0 on most releases; transformers 4.45's Qwen2-VL prepares other inputs in generate() and lands
    1e-3 away. The scores may differ from the reference by that much per branch."""
    first = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                           return_dict_in_generate=True).logits[0].float()
    return float((first - model(**inputs, use_cache=False).logits[:, -1].float()).abs().max())


# Gemma 3 / 4's tiny windows (4) make every case outgrow them: the warning is checked on its own below.
@pytest.mark.filterwarnings("ignore:contrastive decoding. the prompt:UserWarning")
@pytest.mark.parametrize("case", params(DECODING))
def test_greedy_equals_the_reference_that_recomputes_both_branches(case, env):
    family = case.id.split("-")[1]
    if family in NO_REFERENCE_BELOW and hf.tf_version() < NO_REFERENCE_BELOW[family][0]:
        pytest.skip(NO_REFERENCE_BELOW[family][1])
    model = built(case, env)  # skips, naming the release, where the class is not in this one
    if family in CACHED_NOT_FROM_SCRATCH:
        pytest.skip(CACHED_NOT_FROM_SCRATCH[family])
    if refused(case, model):
        return
    inputs = case.decode_inputs(model, (6,), (0,))
    out = calplug.contrastive_generate(model, max_new_tokens=NEW, output_scores=True,
                                       return_dict_in_generate=True, **inputs)
    tokens, scores, largest, zs, cutoffs = reference_decode(case, model, inputs)
    L = inputs["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, L:], tokens)
    assert largest > 1e-3  # the image-blind branch really differs from the main one
    tol = 1e-4 + 3 * generate_round_off(model, inputs)  # (1 + alpha) z - alpha z', alpha = 1
    for ours, ref, z, cutoff in zip(out.scores, scores, zs, cutoffs):
        near_cut = (z - cutoff).abs() < tol  # plausibility is decided by round-off there
        assert torch.equal(torch.isfinite(ours)[~near_cut], torch.isfinite(ref)[~near_cut])
        both = torch.isfinite(ours) & torch.isfinite(ref)
        torch.testing.assert_close(ours[both], ref[both], rtol=1e-4, atol=tol)


@pytest.mark.parametrize("case", params(DECODING))
def test_alpha_zero_gives_generates_tokens_alone_and_in_a_padded_batch(case, env):
    model = built(case, env)
    if refused(case, model):
        pytest.skip(f"{type(model).__name__}: contrastive decoding refused (NOT_DECODED)")
    for inputs in (case.decode_inputs(model, (6,), (0,)), case.decode_inputs(model, (6, 9), (0, 1))):
        plain = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
        ours = calplug.contrastive_generate(model, cd_alpha=0.0, max_new_tokens=NEW, **inputs)
        assert torch.equal(ours, plain)


@pytest.mark.parametrize("case", params(DECODING))
def test_padded_batch_of_two_equals_the_rows_alone(case, env):
    model = built(case, env)
    if refused(case, model):
        pytest.skip(f"{type(model).__name__}: contrastive decoding refused (NOT_DECODED)")
    lengths, seeds = (6, 9), (0, 1)
    batch = case.decode_inputs(model, lengths, seeds)
    assert int((batch["attention_mask"] == 0).sum()) > 0  # the shorter row is padded
    together = calplug.contrastive_generate(model, max_new_tokens=NEW, **batch)
    width = batch["input_ids"].shape[1]
    for row, (n, seed) in enumerate(zip(lengths, seeds)):
        one = case.decode_inputs(model, (n,), (seed,))
        alone = calplug.contrastive_generate(model, max_new_tokens=NEW, **one)
        new = alone[0, one["input_ids"].shape[1]:]
        assert torch.equal(together[row, width:width + new.numel()], new), row


def calls(module) -> tuple[list, object]:
    """A list that grows by one at each forward call of ``module``, and the hook's handle."""
    seen: list = []
    return seen, module.register_forward_pre_hook(lambda m, args: seen.append(1))


@pytest.mark.filterwarnings("ignore:contrastive decoding. the prompt:UserWarning")
@pytest.mark.parametrize("case", params(DECODING))
def test_both_branches_share_one_decoder_call_per_new_token(case, env):
    """After the two prefills (the main pass, the contrast prefix), each new token runs the text
    decoder and the output projection once for both branches (joined: the contrast rows appended
    to generate()'s cache); join=False runs them twice per token and gives the same tokens. Every
    family of the matrix keeps a cache the merge takes (docs/decoding.md)."""
    model = built(case, env)
    if refused(case, model):
        pytest.skip(f"{type(model).__name__}: contrastive decoding refused (NOT_DECODED)")
    inputs = case.decode_inputs(model, (6, 9), (0, 1))
    decoder, head = hf.decoder_and_head(model)
    runs = {}
    for join in (True, False):
        decoder_calls, d = calls(decoder)
        head_calls, h = calls(head)
        try:
            with calplug.contrastive_decoding(model, max_new_tokens=NEW, join=join) as processor:
                out = model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                     logits_processor=[processor])
        finally:
            d.remove()
            h.remove()
        runs[join] = out, len(decoder_calls), len(head_calls), processor.joined, processor.unjoined
    out, decoder_calls, head_calls, joined, why = runs[True]
    unjoined = UNJOINED.get(case.id.split("-")[1])
    if unjoined is not None:  # a cache the merge refuses: two passes, saying why
        assert joined is False and unjoined in why, why
        assert (decoder_calls, head_calls) == (2 * NEW, 2 * NEW)
    else:
        assert joined is True, why
        assert (decoder_calls, head_calls) == (NEW + 1, NEW + 1)  # 2 prefills + NEW - 1 joined steps
    two_pass, decoder_calls, head_calls, joined, why = runs[False]
    assert joined is False and "join=False" in why
    assert (decoder_calls, head_calls) == (2 * NEW, 2 * NEW)
    assert torch.equal(out, two_pass)


@pytest.mark.parametrize("case", params(DECODING[:1]))
def test_inside_generate_equals_contrastive_generate(case, env):
    """The logits processor of `calplug.contrastive_decoding` inside the user's own generate()
    call gives contrastive_generate's tokens; the forward is restored after the block."""
    model = built(case, env)
    inputs = case.decode_inputs(model, (6, 9), (0, 1))
    expected = calplug.contrastive_generate(model, max_new_tokens=NEW, cd_alpha=2.0, **inputs)
    before = dict(model.__dict__)
    with calplug.contrastive_decoding(model, cd_alpha=2.0) as processor:
        inside = model.generate(**inputs, max_new_tokens=NEW, do_sample=False,
                                logits_processor=[processor])
    assert torch.equal(inside, expected)
    assert "forward" not in model.__dict__ and model.__dict__.keys() == before.keys()


# -- on calplug's tiny Llava: pixel contrasts, sampling, refusals -------------------------------------
@pytest.fixture(scope="module")
def llava():
    from calplug.testing import tiny_llava

    return tiny_llava(seed=0).eval()


def llava_inputs(model, lengths=(6,), seeds=(0,)) -> dict:
    from cases import left_padded
    from calplug.testing import llava_batch

    return left_padded([llava_batch(model, lengths=(n,), with_image=(True,), seed=s)
                        for n, s in zip(lengths, seeds)])


def diffused(pixels: torch.Tensor, step: int, seed: int) -> torch.Tensor:
    """VCD's forward diffusion written from its definition: 1000 steps, betas on a sigmoid of
    linspace(-6, 6) from 1e-5 to 5e-3; x_t = sqrt(abar_t) x + sqrt(1 - abar_t) e."""
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    abar = float(torch.cumprod(1 - betas, 0)[step])
    noise = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(seed))
    return (abar ** 0.5 * pixels + (1 - abar) ** 0.5 * noise).float()


@pytest.mark.parametrize("contrast", ["blur", "noise"])
def test_pixel_contrasts_equal_a_forward_on_the_transformed_pixels(llava, contrast):
    """blur / noise: the contrast branch is the model's forward on blurred / noised pixels (the same
    sequence), decoded step by step; greedy tokens and scores equal that reference."""
    from calplug.blur import gaussian_blur

    inputs = llava_inputs(llava, (6, 9), (0, 1))
    px = inputs["pixel_values"]
    blind_px = gaussian_blur(px, 2.0) if contrast == "blur" else diffused(px, 900, seed=3)
    out = calplug.contrastive_generate(llava, contrast=contrast, config={"blur_sigma": 2.0,
                                       "noise_step": 900, "seed": 3}, max_new_tokens=NEW,
                                       output_scores=True, return_dict_in_generate=True, **inputs)
    step, width = dict(inputs), inputs["input_ids"].shape[1]
    with torch.no_grad():
        for t, ours in enumerate(out.scores):
            z = llava(**step, use_cache=False).logits[:, -1].float()
            z_blind = llava(**dict(step, pixel_values=blind_px), use_cache=False).logits[:, -1].float()
            assert float((z - z_blind).abs().max()) > 1e-3
            ref = (2 * z - z_blind).masked_fill(z < math.log(0.1) + z.max(-1, keepdim=True).values, -math.inf)
            both = torch.isfinite(ours) & torch.isfinite(ref)
            torch.testing.assert_close(ours[both], ref[both], rtol=1e-4, atol=1e-4)
            assert torch.equal(out.sequences[:, width + t], ref.argmax(-1))
            step = grown(step, out.sequences[:, width + t])


def test_noise_contrast_trains_against_the_noised_image(llava):
    """The same record serves training: token_gaps with contrast='noise' are the target logits
    minus those of the model's forward on the noised pixels."""
    from calplug.testing import llava_batch

    batch = llava_batch(llava)
    gaps = calplug.token_gaps(llava, batch, contrast="noise", noise_step=600, seed=5)
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        z = llava(**no_labels).logits.float()
        z_blind = llava(**dict(no_labels, pixel_values=diffused(batch["pixel_values"], 600, 5))).logits.float()
    targets = batch["labels"][:, 1:].clamp(min=0).unsqueeze(-1)
    expected = (z[:, :-1].gather(-1, targets) - z_blind[:, :-1].gather(-1, targets)).squeeze(-1)
    rows = gaps.contrasted
    assert bool(rows[0].any()) and not bool(rows[2].any())  # sample 2 is text-only
    torch.testing.assert_close(gaps.gaps[rows], expected[rows], rtol=1e-4, atol=1e-5)
    assert float(gaps.gaps[rows].abs().max()) > 1e-3


def test_sampling_applies_the_rule_before_generates_warpers(llava):
    """cd_alpha = 0 and no plausibility cut sample exactly generate()'s tokens from the same seed;
    with a cut, the finite scores are the plausible tokens and every sample is one."""
    inputs = llava_inputs(llava, (6, 9), (0, 1))
    torch.manual_seed(7)
    plain = llava.generate(**inputs, max_new_tokens=NEW, do_sample=True, top_k=0)
    torch.manual_seed(7)
    same = calplug.contrastive_generate(llava, cd_alpha=0.0, cd_beta=0.0, max_new_tokens=NEW,
                                        do_sample=True, top_k=0, **inputs)
    assert torch.equal(same, plain)
    torch.manual_seed(7)
    out = calplug.contrastive_generate(llava, cd_beta=0.8, max_new_tokens=NEW, do_sample=True,
                                       top_k=0, output_scores=True, output_logits=True,
                                       return_dict_in_generate=True, **inputs)
    width = inputs["input_ids"].shape[1]
    for t, (scores, z) in enumerate(zip(out.scores, out.logits)):
        plausible = z >= math.log(0.8) + z.max(-1, keepdim=True).values
        assert torch.equal(torch.isfinite(scores), plausible)
        assert bool(plausible.gather(1, out.sequences[:, width + t, None]).all())
    assert int(plausible.sum()) < plausible.numel()  # the cut removed tokens


def test_generate_gets_its_own_cache_back(llava):
    """The contrast rows leave generate()'s cache with the last step: the cache it returns holds
    the main rows only, equal to plain generate()'s (cd_alpha=0: the same tokens)."""
    from calplug.decoding_cache import tensors

    inputs = llava_inputs(llava, (6, 9), (0, 1))
    plain = llava.generate(**inputs, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
    ours = calplug.contrastive_generate(llava, cd_alpha=0.0, max_new_tokens=NEW,
                                        return_dict_in_generate=True, **inputs)
    assert torch.equal(ours.sequences, plain.sequences)
    mine, theirs = tensors(ours.past_key_values), tensors(plain.past_key_values)
    assert len(mine) == len(theirs) > 0
    for a, b in zip(mine, theirs):
        assert a.shape == b.shape and a.shape[0] == 2
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bad_settings_and_modes_are_refused_naming_the_fix(llava):
    inputs = llava_inputs(llava)
    for bad in ({"cd_alpha": -1.0}, {"cd_beta": 2.0}, {"cd_beta": float("nan")}, {"cd_alpha": True}):
        with pytest.raises(calplug.CALConfigError, match=next(iter(bad))):
            calplug.contrastive_generate(llava, max_new_tokens=1, **bad, **inputs)
    with pytest.raises(calplug.CALInputError, match="beam search"):
        calplug.contrastive_generate(llava, max_new_tokens=1, num_beams=2, **inputs)
    with pytest.raises(calplug.CALConfigError, match="contrast"):
        calplug.contrastive_generate(llava, contrast="sharpen", max_new_tokens=1, **inputs)
    with calplug.contrastive_decoding(llava) as processor:
        pass
    with pytest.raises(calplug.CALInputError, match="inside its"):  # used after its block
        llava.generate(**inputs, max_new_tokens=1, logits_processor=[processor])


def test_a_model_that_splices_the_image_inside_generate_is_refused(llava):
    """As the LLaVA codebases do: generate() merges the image into inputs_embeds itself, so the
    forward it calls never holds pixels or placeholders."""
    def generate(self, input_ids=None, pixel_values=None, attention_mask=None, **kwargs):
        image = getattr(self.config, "image_token_id", None) or self.config.image_token_index
        embeds = self.get_input_embeddings()(input_ids.clamp(max=image - 1))
        return type(self).__mro__[1].generate(self, inputs_embeds=embeds, attention_mask=attention_mask,
                                              **kwargs)

    from calplug.testing import tiny_llava

    model = tiny_llava(seed=0).eval()
    model.__class__ = type("SplicingLlava", (type(model),), {"generate": generate})
    with pytest.raises(calplug.UnsupportedModelError, match="inside its own generate"):
        calplug.contrastive_generate(model, max_new_tokens=2, **llava_inputs(model))


def test_sliding_window_the_sequence_outgrows_decodes_with_mask(monkeypatch):
    """Gemma 3 counts its sliding window in cache positions: with the prompt inside the window
    and prompt + new tokens beyond it, drop would widen the contrast branch's windows. With
    max_new_tokens known it decodes with mask (warned) and equals the reference; the bare
    processor, which cannot know, stops at the step that leaves the window."""
    skip_unrunnable_family(hf.FAMILIES["gemma3"])
    from calplug import errors
    from cases import family_case

    monkeypatch.setattr(errors, "_WARNED", set())
    case = family_case("gemma3", "image", "right")
    model = hf.build_gemma3(0, window=14).eval()
    inputs = case.decode_inputs(model, (6,), (0,))
    assert inputs["input_ids"].shape[1] + NEW > 14 >= inputs["input_ids"].shape[1]
    with pytest.warns(UserWarning, match="sliding window"):
        out = calplug.contrastive_generate(model, max_new_tokens=NEW, **inputs)
    tokens = reference_decode(case, model, inputs)[0]
    assert torch.equal(out[:, inputs["input_ids"].shape[1]:], tokens)
    with calplug.contrastive_decoding(model) as processor, \
            pytest.raises(calplug.CALInputError, match="sliding window"):
        model.generate(**inputs, max_new_tokens=NEW, do_sample=False, logits_processor=[processor])
