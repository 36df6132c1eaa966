"""Fast CAL (issue 8): the default ``drop`` contrast, no extra full logits, skipped work, and the
ZeRO-3-safe agreement on skipping.

* drop's gaps equal mask's (the published contrast) on every text row; only the rows documented
  in `calplug.contrast` differ (rows at image positions and at padding; left padding gets 0).
* a batch without images costs exactly one decoder forward; text-only samples and padding are
  not part of the contrast pass.
* the contrast side never calls ``lm_head`` and never makes a tensor with a vocabulary-sized
  dimension; the main side hands the loss the logits the model produced (no copy) and allocates
  no more full-size ``[B, L, V]`` tensors than the unpatched model does.
* with a (faked) sharded model on two gloo ranks, a rank whose micro-batch has no image still
  runs the placeholder contrast pass when the other rank has images, and both finish.
"""
from __future__ import annotations

import datetime
import inspect
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import calplug
from calplug import distributed, plugins
from calplug.hookspecs import hookimpl
from calplug.testing import llava_batch, tiny_llava
from _recording import ShapeRecorder, record_calls
from _skips import missing, skip_unrunnable_family

VOCAB = 1000  # distinctive: no other dimension of the tiny model is 1000


@pytest.fixture(scope="module")
def llava():
    torch.manual_seed(0)
    model = tiny_llava(0, vocab_size=VOCAB)
    model.train()
    return model


def _decoder_and_head(model):
    from calplug.integrations import compat

    return compat.vlm_decoder_and_head(model)


def cal_gaps(model, batch, contrast):
    with calplug.enabled(model, contrast=contrast):
        return model(**batch).cal_gaps


FAMILY_NAMES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _family(name):
    """A family of tests/_hf_families.py (skipped only where this transformers release lacks it)
    and its tiny model; every one of `FAMILY_NAMES` has an integration, so none is looked up
    here: a missing one fails the test."""
    import _hf_families

    family = _hf_families.FAMILIES[name]
    skip_unrunnable_family(family)
    return _hf_families, family, family.build(0).train()


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_chunked_loss_equals_full_loss_families(name):
    helpers, family, model = _family(name)
    batch = helpers.make_batch(family, model, kinds=("image", None, "image"), lengths=(10, 8, 9), seed=2)
    full, g_full = _step(model, batch)
    chunked, g_chunk = _step(model, batch, loss_chunk=5)
    torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-5, atol=1e-6)
    scale = max(float(g.abs().max()) for g in g_full.values())
    assert g_full.keys() == g_chunk.keys()
    for n in g_full:
        torch.testing.assert_close(g_chunk[n], g_full[n], rtol=1e-4, atol=1e-5 * scale, msg=n)
    assert chunked.logits.shape[1] == 1


def test_left_padding_rows_with_nothing_before_get_zero(llava):
    batch = llava_batch(llava, seed=5, lengths=(12, 6), with_image=(True, True), padding_side="left")
    drop = cal_gaps(llava, batch, "drop")
    pad = (batch["attention_mask"] == 0)[:, :-1]
    assert int(pad.sum()) >= 6
    assert torch.count_nonzero(drop[pad]) == 0


def test_drop_row_at_last_image_position_uses_text_before_image(llava):
    """The documented choice: the row that predicts the first text token after the image is
    predicted, without the image, from the text before the image. Checked against a plain
    text-only forward of the (unpatched) model over that prefix."""
    # prompt=1: the text token before the image is the prompt, everything after it is supervised
    batch = llava_batch(llava, seed=7, lengths=(11, 8), with_image=(True, True), prompt=1)
    ids, labels = batch["input_ids"], batch["labels"]
    image_token = llava.config.image_token_index
    drop = cal_gaps(llava, batch, "drop")
    llava.eval()
    try:
        for b in range(ids.shape[0]):
            image_pos = (ids[b] == image_token).nonzero().squeeze(1)
            first, last = int(image_pos[0]), int(image_pos[-1])
            target = int(labels[b, last + 1])  # the first text token after the image
            assert target == int(ids[b, last + 1])
            with torch.no_grad():
                # every sample has an image, so sample b's pixels are pixel_values[b]
                full = llava(**{k: v[b:b + 1] for k, v in batch.items() if k != "labels"}).logits
                prefix = llava(input_ids=ids[b:b + 1, :first]).logits
            expected = full[0, last, target] - prefix[0, -1, target]
            torch.testing.assert_close(drop[b, last], expected.float(), rtol=1e-4, atol=1e-4)
    finally:
        llava.train()


# -- skipped work ---------------------------------------------------------------------------------
@pytest.mark.parametrize("contrast", ["drop", "mask"])
def test_batch_without_images_runs_exactly_one_forward(llava, contrast):
    decoder, lm_head = _decoder_and_head(llava)
    batch = llava_batch(llava, seed=1, lengths=(9, 7), with_image=(False, False))
    assert batch["pixel_values"] is None
    with calplug.enabled(llava, contrast=contrast), record_calls(decoder) as dec, \
            record_calls(lm_head) as head:
        out = llava(**batch)
    assert len(dec) == 1 and len(head) == 1
    assert torch.count_nonzero(out.cal_gaps) == 0
    assert torch.all(out.cal_weights == 1.0)  # alpha: plain cross-entropy
    # ... and the loss is then the model's own loss.
    with torch.no_grad():
        plain = llava(**batch).loss
    torch.testing.assert_close(out.loss.detach(), plain, rtol=1e-5, atol=1e-6)


class _CaptureLoss:
    def __init__(self):
        self.logits = None

    @hookimpl(tryfirst=True)
    def calplug_loss(self, logits):
        self.logits = logits
        return None  # let the built-in loss answer


def test_loss_gets_the_logits_the_model_produced(llava):
    _, lm_head = _decoder_and_head(llava)
    produced = []
    handle = lm_head.register_forward_hook(lambda m, i, o: produced.append(o))
    capture = _CaptureLoss()
    plugins.register(capture, name="test-capture-loss")
    try:
        batch = llava_batch(llava, seed=6)
        with calplug.enabled(llava):
            out = llava(**batch)
    finally:
        plugins.unregister(name="test-capture-loss")
        handle.remove()
    assert len(produced) == 1
    assert capture.logits is produced[0]            # the very tensor, not a copy
    assert out.logits is produced[0]


class BigAllocations(TorchDispatchMode):
    """Counts op outputs with at least ``threshold`` elements that own new storage."""

    def __init__(self, threshold):
        super().__init__()
        self.threshold = threshold
        self.count = 0
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.numel() >= self.threshold \
                    and t.untyped_storage().data_ptr() not in inputs:
                self.count += 1
                self.ops.append(str(func))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cal_step_makes_no_more_full_logit_tensors_than_plain(dtype):
    model = tiny_llava(2, vocab_size=VOCAB).to(dtype).train()
    batch = llava_batch(model, seed=8, lengths=(12, 9, 10), with_image=(True, True, False))
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    # As big as the logits of the non-padding rows: transformers < 4.52 Llava drops padding rows
    # before its loss, so its loss-side tensors are that size rather than [B, L, V].
    threshold = int(batch["attention_mask"][:, 1:].sum()) * VOCAB

    def count(step):
        mode = BigAllocations(threshold)
        with mode:
            loss = step()
            loss.backward()
        model.zero_grad(set_to_none=True)
        return mode

    plain = count(lambda: model(**batch).loss)
    with calplug.enabled(model):
        cal = count(lambda: model(**batch).loss)
    with calplug.enabled(model, contrast="mask"):
        faithful = count(lambda: model(**batch).loss)
    assert plain.count >= 2  # the logits and the cross-entropy's log-softmax at least
    assert cal.count <= plain.count, (cal.ops, plain.ops)
    assert faithful.count <= plain.count, (faithful.ops, plain.ops)


# -- ZeRO-3 style agreement on skipping (2 gloo ranks, CPU) ----------------------------------------
SHARDED_CASES = ("mixed", "none")


def _sharded_worker(rank, world, init_file, cases, results):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        from calplug import distributed as dist_mod
        from calplug.testing import llava_batch as batch_fn, tiny_llava as model_fn

        dist_mod.is_sharded = lambda model: True  # pretend ZeRO-3 partitioned the parameters
        for case in cases:  # one launch, a fresh model and fresh hooks per case
            results[(case, rank)] = _sharded_step(rank, world, case, model_fn, batch_fn)
    finally:
        torch.distributed.destroy_process_group()


def _sharded_step(rank, world, case, model_fn, batch_fn) -> dict:
    model = model_fn(0).train()
    from calplug.integrations import compat

    decoder, _ = compat.vlm_decoder_and_head(model)
    # Stand-in for ZeRO-3's parameter gathering: every decoder layer call is a collective that
    # checks all ranks are at the same layer. A rank that skipped a pass the other rank runs
    # would pair different layers (or time out).
    layer_calls = []

    def gather(idx):
        def pre_hook(module, args):
            t = torch.tensor([idx], dtype=torch.long)
            out = [torch.zeros_like(t) for _ in range(world)]
            torch.distributed.all_gather(out, t)
            if len({int(x) for x in out}) != 1:
                raise RuntimeError(f"collective mismatch: layers {[int(x) for x in out]}")
            layer_calls.append(idx)
        return pre_hook

    for i, layer in enumerate(decoder.layers):
        layer.register_forward_pre_hook(gather(i))
    has_image = {"mixed": rank == 0, "none": False, "both": True}[case]
    batch = batch_fn(model, seed=rank, lengths=(10, 8),
                     with_image=(has_image, False))
    seen = []
    decoder.register_forward_pre_hook(
        lambda m, a, k: seen.append(tuple(k["inputs_embeds"].shape)), with_kwargs=True)
    with calplug.enabled(model):
        out = model(**batch)
    out.loss.backward()
    torch.distributed.barrier()
    return {"decoder_calls": seen, "layer_calls": len(layer_calls),
            "loss": float(out.loss), "nonzero_delta": int(torch.count_nonzero(out.cal_gaps))}


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    """Both cases' results from one two-rank launch (each case on a fresh model, one after the
    other on the same process group): the processes start once, not once a case."""
    import torch.multiprocessing as mp

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        missing("gloo", "needs torch.distributed with the gloo backend (this torch build has none)")
    results = mp.Manager().dict()
    init_file = tmp_path_factory.mktemp("sharded") / "pg"
    mp.spawn(_sharded_worker, args=(2, str(init_file), SHARDED_CASES, results), nprocs=2, join=True)
    return dict(results)


@pytest.mark.parametrize("case", SHARDED_CASES)
def test_sharded_ranks_agree_on_skipping_the_contrast_pass(sharded_results, case):
    r0, r1 = sharded_results[(case, 0)], sharded_results[(case, 1)]
    n_layers = 2
    if case == "mixed":
        # Rank 0 contrasts its image sample; rank 1 (no image) runs the one-token placeholder.
        assert len(r0["decoder_calls"]) == 2 and len(r1["decoder_calls"]) == 2
        assert r0["decoder_calls"][1][:2] == (1, 10)  # the image sample's 10 text tokens...
        assert r1["decoder_calls"][1][:2] == (1, 1)   # ... and the placeholder's single token
        assert r0["nonzero_delta"] > 0 and r1["nonzero_delta"] == 0
    else:
        # Nobody has an image: both agree to skip; one forward each.
        assert len(r0["decoder_calls"]) == 1 and len(r1["decoder_calls"]) == 1
    assert r0["layer_calls"] == r1["layer_calls"] == n_layers * len(r0["decoder_calls"])


def test_not_sharded_rank_skips_without_collective(llava, monkeypatch):
    """Without sharding, `any_rank` is local: no all-reduce is attempted (none is initialised)."""
    calls = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: calls.append(a))
    decoder, _ = _decoder_and_head(llava)
    batch = llava_batch(llava, seed=1, lengths=(9, 7), with_image=(False, False))
    with calplug.enabled(llava), record_calls(decoder) as dec:
        llava(**batch)
    assert len(dec) == 1 and calls == []
    assert distributed.any_rank(False, llava) is False


def test_default_contrast_is_drop():
    assert calplug.CALConfig().contrast == "drop"
    assert calplug.CALConfig.faithful().contrast == "mask"


@pytest.mark.parametrize("chunk", [3, 4096])
def test_hidden_target_logits_with_shared_rows_equals_full_product(monkeypatch, chunk):
    from calplug import gap

    monkeypatch.setattr(gap, "_CHUNK_ROWS", chunk)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 8, generator=g)
    weight, bias = torch.randn(40, 8, generator=g), torch.randn(40, generator=g)
    rows = torch.tensor([0, 0, 0, 4, 2, 2, 1, 3, 3, 3, 0])           # states shared by many rows
    targets = torch.randint(0, 40, (rows.numel(),), generator=g)
    full = hidden @ weight.T + bias                                   # [5, V]: the reference
    expected = full[rows, targets]
    got = gap.hidden_target_logits(hidden, weight, bias, targets, rows=rows)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(gap.hidden_target_logits(hidden[rows], weight, bias, targets), expected)


# -- optional chunked loss (loss_chunk > 0): no full logits at all ---------------------------------
def _step(model, batch, **cal):
    extra = {}
    params = inspect.signature(model.forward).parameters
    if "num_items_in_batch" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        extra["num_items_in_batch"] = torch.tensor(31)  # transformers Llava takes it from 4.49 on
    with calplug.enabled(model, **cal):
        out = model(**batch, **extra)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("contrast", ["drop", "mask"])
@pytest.mark.parametrize("chunk", [7, 4096])
def test_chunked_loss_equals_the_loss_on_full_logits(llava, contrast, chunk):
    batch = llava_batch(llava, seed=9, lengths=(12, 9, 10), with_image=(True, True, False))
    full, g_full = _step(llava, batch, contrast=contrast)
    chunked, g_chunk = _step(llava, batch, contrast=contrast, loss_chunk=chunk)
    torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked.cal_gaps, full.cal_gaps, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(chunked.cal_weights, full.cal_weights, rtol=1e-4, atol=1e-5)
    assert g_full.keys() == g_chunk.keys() and any(n.endswith("lm_head.weight") for n in g_full)
    scale = max(float(g.abs().max()) for g in g_full.values())
    for name in g_full:
        torch.testing.assert_close(g_chunk[name], g_full[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
    B, L = batch["input_ids"].shape
    assert chunked.logits.shape == (B, 1, VOCAB)          # the last position only, as documented
    torch.testing.assert_close(chunked.logits[:, 0], full.logits[:, -1].detach(), rtol=1e-5, atol=1e-5)


def test_chunked_loss_never_makes_full_logits(llava):
    _, lm_head = _decoder_and_head(llava)
    batch = llava_batch(llava, seed=4, lengths=(12, 9, 10), with_image=(True, True, False))
    B, L = batch["input_ids"].shape
    chunk = 8
    mode = ShapeRecorder()
    produced = []
    handle = lm_head.register_forward_hook(lambda m, i, o: produced.append(tuple(o.shape)))
    try:
        with calplug.enabled(llava, loss_chunk=chunk), mode:
            out = llava(**batch)
            out.loss.backward()
    finally:
        handle.remove()
    llava.zero_grad(set_to_none=True)
    assert produced == [(B, 1, VOCAB)]          # the model's lm_head ran on the last position only
    d = llava.config.text_config.hidden_size
    with_vocab = {shape for _, shape in mode.shapes if VOCAB in shape}
    assert B * L > max(chunk, d)
    # every vocabulary-sized tensor: the last-position logits [B, 1, V] (and its [B, V] matmul),
    # lm_head-weight-sized gradients [V, d], one chunk's [<= chunk, V] logits (or their
    # transpose); never a [B, L, V] or [B * L, V] one.
    assert all(s == (B, 1, VOCAB) or s == (VOCAB,)
               or (len(s) == 2 and VOCAB in s and s[0] * s[1] // VOCAB <= max(chunk, d))
               for s in with_vocab), with_vocab
    assert (chunk, VOCAB) in with_vocab
    # the same recorder does see the full logits on the default path
    with calplug.enabled(llava), ShapeRecorder() as default:
        llava(**batch).loss.backward()
    llava.zero_grad(set_to_none=True)
    assert (B, L, VOCAB) in {shape for _, shape in default.shapes}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_weighted_cross_entropy_equals_the_spec_on_full_logits(dtype):
    """The chunked loss (gradients computed chunk by chunk in its forward) against step 7 written
    here on full logits: the output projection in the model's dtype, float32 cross-entropy of
    every shifted row (0 where ignored), ``sum(ce * w) / (sum of supervised w + 1e-6)``, scaled by
    the micro-batch's share of ``num_items_in_batch`` supervised tokens. Value and the gradients
    of hidden states, weight and bias."""
    from calplug.loss import chunked_weighted_cross_entropy

    g = torch.Generator().manual_seed(0)
    B, L, d, V = 3, 11, 8, 50
    h = torch.randn(B, L, d, generator=g).to(dtype).requires_grad_()
    W = torch.randn(V, d, generator=g).to(dtype).requires_grad_()
    bias = torch.randn(V, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[:, :3] = -100
    labels[1, 7:] = -100
    weights = torch.rand(B, L - 1, generator=g) + 1
    items = 17
    logits = F.linear(h, W, bias)[:, :-1].reshape(-1, V).float()
    every_row = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100,
                                reduction="none").view(B, L - 1)
    supervised = labels[:, 1:] != -100
    spec = (every_row * weights).sum() / (weights[supervised].sum() + 1e-6) * supervised.sum() / items
    got = chunked_weighted_cross_entropy(h, W, bias, labels, weights, 4, items)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(got, spec, **tol)
    for a, b in zip(torch.autograd.grad(2.5 * spec, (h, W, bias)), torch.autograd.grad(2.5 * got, (h, W, bias))):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(b.float(), a.float(), **tol)


def test_chunked_loss_refuses_what_it_cannot_do(llava, monkeypatch):
    batch = llava_batch(llava, seed=1)
    with pytest.raises(calplug.CALConfigError, match="loss_chunk"):
        calplug.CALConfig(loss_chunk=-1)
    capture = _CaptureLoss()
    plugins.register(capture, name="test-capture-loss")
    try:
        with pytest.raises(calplug.CALConfigError, match="test-capture-loss"):  # refused at enable
            calplug.enable(llava, loss_chunk=16)
        assert not calplug.is_enabled(llava)
    finally:
        plugins.unregister(name="test-capture-loss")
    with calplug.enabled(llava, loss_chunk=16):  # a plugin registered after enable: the step refuses
        plugins.register(capture, name="test-capture-loss")
        try:
            with pytest.raises(calplug.CALConfigError, match="test-capture-loss"):
                llava(**batch)
        finally:
            plugins.unregister(name="test-capture-loss")
    monkeypatch.setattr(distributed, "is_sharded", lambda model: True)
    with calplug.enabled(llava, loss_chunk=16), pytest.raises(calplug.CALConfigError, match="ZeRO-3"):
        llava(**batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_on_supervised_rows_equals_loss_over_every_row(dtype):
    """`weighted_cross_entropy` runs log-softmax on the supervised rows only; the spec's form sums
    ce * w over every row (ce = 0 on ignored rows). Same value and same logits gradient."""
    from calplug.loss import EPS, weighted_cross_entropy

    g = torch.Generator().manual_seed(3)
    B, L, V = 3, 13, 40
    logits = torch.randn(B, L, V, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[:, :4] = -100
    labels[2, 9:] = -100
    weights = torch.rand(B, L - 1, generator=g) * 4 + 1
    supervised = labels[:, 1:] != -100
    # the spec's form, written here: cross-entropy of every shifted row (0 where ignored), float32
    every_row = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1),
                                ignore_index=-100, reduction="none").view(B, L - 1)
    spec = (every_row * weights).sum() / (weights[supervised].sum() + EPS)
    got = weighted_cross_entropy(logits, labels, weights)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got, spec, **tol)
    (g_spec,) = torch.autograd.grad(spec, logits)
    (g_got,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(g_got, g_spec, **tol)
    assert torch.count_nonzero(g_got[:, :3]) == 0  # rows 0..2 predict ignored tokens 1..3
