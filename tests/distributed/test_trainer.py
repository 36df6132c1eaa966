"""HF Trainer and TRL SFTTrainer with CAL: end to end, gradient accumulation with
``num_items_in_batch``, and the logging callback.

What the installed transformers Trainer does (read from its source, checked here by recording):
with gradient accumulation it counts the supervised tokens of *all* micro-batches of the
optimizer step (``labels[..., 1:] != -100``, summed over ranks when
``average_tokens_across_devices``), passes that count as ``num_items_in_batch`` to every
micro-batch's forward, and then does *not* divide the loss by the accumulation steps. calplug
therefore returns, per micro-batch ``m``, ``CAL_m * n_m / N`` (``CAL_m`` the spec's weighted mean
over the micro-batch, ``n_m`` its supervised tokens, ``N`` the count the Trainer passed), so the
accumulated gradient is ``sum_m (n_m / N) * grad CAL_m``: the token-weighted average of the
micro-batch CAL losses (docs/distributed.md).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from _skips import importorskip, missing, module_found, needs  # noqa: E402

importorskip("accelerate", "accelerate", "the HF Trainer needs it (pip install accelerate): tox -e distributed")

import calplug
from calplug import plugins
from calplug.trainer import CALStats, enable_for_trainer, use_model_loss

import _hf
from _common import make_model

pytestmark = pytest.mark.slow


def _args(tmp_path, **kw):
    return _hf.training_args(tmp_path / "out", **kw)


def _record_niib(model):
    seen = []
    handle = model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k.get("num_items_in_batch")), with_kwargs=True)
    return seen, handle


def _expected_grads(micro_batches, mean=False, **cal):
    """The documented formula, computed by hand on a fresh model: sum_m (n_m / N) grad CAL_m
    (``mean=True``: the plain mean over micro-batches, for contrast)."""
    model = make_model()
    calplug.enable(model, **cal)
    counts = [int((mb["labels"][:, 1:] != -100).sum()) for mb in micro_batches]
    N = sum(counts)
    losses = []
    for mb, n in zip(micro_batches, counts):
        out = model(**mb)                       # no num_items_in_batch: the spec's loss
        (out.loss / len(counts) if mean else out.loss * n / N).backward()
        losses.append(float(out.loss.detach()))
    return _hf.grad_snapshot(model), counts, losses


def _assert_grads_close(got, want):
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=2e-6, rtol=1e-4,
                                   msg=lambda m, n=n: f"{n}: {m}")


def test_trainer_grad_accumulation_is_token_weighted_cal(tmp_path):
    from transformers import Trainer

    model = make_model()
    collator = _hf.RecordingCollator()
    grads = _hf.GradsAtFirstStep()
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_hf.samples(model),
                      data_collator=collator, callbacks=[grads])
    enable_for_trainer(trainer, log=False)
    assert calplug.is_enabled(model)
    seen, handle = _record_niib(model)
    trainer.train()
    handle.remove()
    micro = collator.batches[:2]
    want, counts, losses = _expected_grads(micro)
    assert counts[0] != counts[1]  # otherwise token weighting and a plain mean coincide
    # What the Trainer really passed: the token count of both micro-batches, to both forwards.
    assert [int(x) for x in seen] == [sum(counts)] * 2
    _assert_grads_close(grads.grads, want)
    # The logged loss is the same token-weighted average (the Trainer did not divide by 2).
    logged = trainer.state.log_history[0]["loss"]
    weighted = sum(n * l for n, l in zip(counts, losses)) / sum(counts)
    assert logged == pytest.approx(weighted, abs=1e-5)
    # A plain mean over micro-batches (dividing by the accumulation steps) is a different gradient.
    plain_mean, _, _ = _expected_grads(micro, mean=True)
    diff = max(float((plain_mean[n] - want[n]).abs().max()) for n in want)
    assert diff > 1e-3, diff


def test_trainer_cal_with_unit_weights_equals_the_unpatched_trainer(tmp_path):
    """alpha = beta = 1 makes every CAL weight 1: the accumulated gradient must then be exactly
    transformers' own num_items_in_batch-normalised cross-entropy gradient."""
    from transformers import Trainer

    def run(cal):
        model = make_model()
        grads = _hf.GradsAtFirstStep()
        trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_hf.samples(model),
                          data_collator=_hf.RecordingCollator(), callbacks=[grads])
        if cal:
            enable_for_trainer(trainer, log=False, alpha=1.0, beta=1.0)
        trainer.train()
        return grads.grads, trainer.state.log_history[0]["loss"]

    plain_grads, plain_loss = run(False)
    cal_grads, cal_loss = run(True)
    _assert_grads_close(cal_grads, plain_grads)
    assert cal_loss == pytest.approx(plain_loss, abs=1e-5)


def test_logging_callback_reports_weights_shares_and_histogram(tmp_path, monkeypatch):
    from transformers import Trainer

    has_tb = module_found("tensorboard")
    model = make_model()
    collator = _hf.RecordingCollator()
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    args = _args(tmp_path, max_steps=2, report_to=["tensorboard"] if has_tb else "none")
    trainer = Trainer(model=model, args=args, train_dataset=_hf.samples(model),
                      data_collator=collator)
    callback = enable_for_trainer(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    assert plugins.get_plugin_manager().get_plugin(callback.stats.name) is None  # unregistered
    # Recompute step 1's statistics by hand from its two micro-batches on the initial weights.
    ref = make_model()
    calplug.enable(ref)
    w_all, d_all = [], []
    for mb in collator.batches[:2]:
        out = ref(**mb)
        sup = mb["labels"][:, 1:] != -100
        w_all.append(out.cal_weights[sup])
        d_all.append(out.cal_gaps[sup])
    w, d = torch.cat(w_all), torch.cat(d_all)
    first = trainer.state.log_history[0]
    assert first["cal/tokens"] == w.numel()
    assert first["cal/mean_weight"] == pytest.approx(float(w.mean()), abs=1e-5)
    assert first["cal/share_alpha"] == pytest.approx(float((d <= 1.0).float().mean()), abs=1e-6)
    assert first["cal/share_beta"] == pytest.approx(float((d >= 5.0).float().mean()), abs=1e-6)
    assert 1.2 <= first["cal/mean_weight"] <= 4.0        # not all at alpha, not all at beta
    assert 0 < first["cal/share_alpha"] < 1 and 0 < first["cal/share_beta"] < 1
    assert "cal/mean_weight" in trainer.state.log_history[1]  # every training log
    counts, edges = callback.last_histogram
    assert int(counts.sum()) == trainer.state.log_history[1]["cal/tokens"]
    assert edges[0] == -3.0 and edges[-1] == 9.0
    if not has_tb:
        missing("tensorboard", "tensorboard is not installed: the TensorBoard half of this test "
                               "needs it (pip install tensorboard): tox -e distributed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    scalar = next(t for t in tags["scalars"] if t.endswith("cal/mean_weight"))
    assert [e.step for e in acc.Scalars(scalar)] == [1, 2]
    assert acc.Scalars(scalar)[0].value == pytest.approx(first["cal/mean_weight"], abs=1e-5)
    assert "cal/gap" in tags["histograms"]
    hist = acc.Histograms("cal/gap")
    assert [h.step for h in hist] == [1, 2]
    assert hist[0].histogram_value.num == first["cal/tokens"]


def test_cal_stats_without_a_trainer():
    model = make_model()
    from calplug.testing import llava_batch

    batch = llava_batch(model)
    stats = CALStats(bins=8).register()
    try:
        with calplug.enabled(model, alpha=0.5, beta=2.0):
            out = model(**batch)
    finally:
        stats.unregister()
    sup = batch["labels"][:, 1:] != -100
    s = stats.scalars()
    assert s["cal/tokens"] == int(sup.sum())
    assert s["cal/mean_weight"] == pytest.approx(float(out.cal_weights[sup].mean()), abs=1e-6)
    assert s["cal/share_alpha"] == pytest.approx(float((out.cal_gaps[sup] <= 0.5).float().mean()))
    counts, edges = stats.histogram()
    assert int(counts.sum()) == int(sup.sum()) and edges.numel() == 9
    assert edges[0] == pytest.approx(-1.0) and edges[-1] == pytest.approx(3.5)
    stats.reset()
    assert stats.scalars() == {} and stats.histogram() is None


def _checkpointing_field(config_cls):
    fields = config_cls.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


needs_trl = needs("trl", module_found("trl"), "trl is not installed (pip install trl): tox -e distributed")


@needs_trl
def test_trl_sft_trainer_trains_on_the_cal_loss(tmp_path):
    from trl import SFTConfig, SFTTrainer

    model = make_model()
    collator = _hf.RecordingCollator()
    grads = _hf.GradsAtFirstStep()
    args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2,
                     gradient_accumulation_steps=2, max_steps=2, learning_rate=0.1, optim="sgd",
                     lr_scheduler_type="constant", max_grad_norm=0.0, report_to="none",
                     logging_steps=1, save_strategy="no", use_cpu=True, seed=0,
                     dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False,
                     max_length=None, bf16=False,  # TRL defaults to bf16 autocast
                     **{_checkpointing_field(SFTConfig): False},
                     dataset_kwargs={"skip_prepare_dataset": True})
    trainer = SFTTrainer(model=model, args=args, train_dataset=_hf.hf_dataset(_hf.samples(model)),
                         processing_class=_hf.tiny_tokenizer(), data_collator=collator,
                         callbacks=[grads])
    # TRL computes its own cross-entropy through a fused LM head (``fused_lm_head=True``) and
    # ignores the model's loss: with CAL merely enabled on the model, calplug refuses loudly.
    from calplug.errors import CALConfigError

    batch = collator([_hf.samples(model)[i] for i in range(2)])
    with calplug.enabled(trainer.model):
        with pytest.raises(CALConfigError, match="enable_for_trainer"):
            trainer.compute_loss(trainer.model, dict(batch))
    sft_loss = trainer.compute_loss(trainer.model, dict(batch))     # TRL's own cross-entropy
    stats = CALStats().register()
    try:
        with calplug.enabled(trainer.model):
            assert use_model_loss(trainer)
            cal_loss = trainer.compute_loss(trainer.model, dict(batch))
        assert stats.steps == 1
        ref = make_model()
        plain = float(ref(**batch).loss.detach())
        with calplug.enabled(ref):
            out = ref(**batch)
        assert float(cal_loss.detach()) == pytest.approx(float(out.loss.detach()), abs=1e-6)
        assert float(sft_loss.detach()) == pytest.approx(plain, abs=1e-5)   # TRL's = plain CE
        assert abs(float(cal_loss.detach()) - plain) > 0.1                    # and CAL is not
    finally:
        stats.unregister()
    del trainer.compute_loss                                      # back to TRL's own
    collator.batches.clear()
    callback = enable_for_trainer(trainer)
    trainer.train()
    want, counts, losses = _expected_grads(collator.batches[:2])
    _assert_grads_close(grads.grads, want)
    logs = trainer.state.log_history
    assert logs[0]["loss"] == pytest.approx(sum(n * l for n, l in zip(counts, losses)) / sum(counts),
                                            abs=1e-5)
    assert all(math.isfinite(l["loss"]) and "cal/mean_weight" in l for l in logs[:2])
    assert callback.last_histogram is not None


def test_two_process_trainer_is_token_weighted_cal_over_the_global_batch(tmp_path):
    """`torchrun --nproc_per_node 2`-style launch (two processes, DDP over gloo): each rank
    accumulates two micro-batches. The Trainer counts the supervised tokens of all four (both
    ranks, ``average_tokens_across_devices``), passes that count to every forward, multiplies each
    rank's loss by the number of processes, and DDP averages the gradients: the update must be the
    token-weighted average of the four micro-batch CAL losses, as in one process. The logged CAL
    statistics are summed over both ranks and describe all four micro-batches."""
    from _launch import describe, launch

    worker = Path(__file__).with_name("_trainer_worker.py")
    result = launch([], tmp_path, timeout=300.0, worker=worker)
    assert not result["timed_out"] and set(result["returncodes"]) == {0}, describe(result)
    ranks = [torch.load(tmp_path / f"trainer_rank{r}.pt") for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    micro = ranks[0]["batches"] + ranks[1]["batches"]
    _assert_ranks_match_one_process(ranks, micro)


def test_two_process_trainer_with_accelerate_fsdp2_trains_cal_and_logs_stats_over_ranks(tmp_path):
    """The same two-process Trainer step with the Trainer's FSDP settings
    (``fsdp="full_shard auto_wrap"``, ``fsdp_config={"fsdp_version": 2, ...}``): accelerate
    really wraps the model in FSDP2 units (on CPU ranks only with the worker's shim, since
    accelerate 1.15 silently keeps DDP there), calplug enabled before the Trainer survives the
    wrapping, the gathered gradient equals the token-weighted CAL formula over all four
    micro-batches, and `calplug.trainer.attach`'s ``cal/`` statistics are summed over ranks."""
    from _launch import describe, launch

    worker = Path(__file__).with_name("_trainer_worker.py")
    result = launch(["--fsdp", "2"], tmp_path, timeout=300.0, worker=worker)
    assert not result["timed_out"] and set(result["returncodes"]) == {0}, describe(result)
    ranks = [torch.load(tmp_path / f"trainer_rank{r}.pt") for r in range(2)]
    for rec in ranks:
        facts = rec["fsdp"]
        assert facts["distributed_type"] == "DistributedType.FSDP", facts
        assert facts["wrapped"] == "FSDPLlavaForConditionalGeneration", facts  # not DDP
        assert facts["enabled"]
        # accelerate's FSDP2 layout: the decoder and CLIP layers, input embedding, lm_head, root.
        assert {"<root>", "lm_head", "model.language_model.embed_tokens",
                "model.language_model.layers.0", "model.vision_tower.encoder.layers.0"} \
            <= set(facts["units"]), facts["units"]
        assert facts["head_type"] == "DTensor"
        assert facts["head_local_numel"] == facts["head_numel"] // 2  # really sharded
    _assert_ranks_match_one_process(ranks, ranks[0]["batches"] + ranks[1]["batches"])


def _assert_ranks_match_one_process(ranks, micro) -> None:
    """Both ranks' forwards got the global token count, their gathered gradient equals the
    one-process formula over all micro-batches, and the first log's ``cal/`` statistics cover
    every supervised row of them (summed over ranks)."""
    want, counts, losses = _expected_grads(micro)
    assert len(set(counts)) > 1
    for rec in ranks:
        assert rec["num_items_in_batch"] == [sum(counts)] * 2  # global count, both forwards
        _assert_grads_close(rec["grads"], want)                  # gathered = the formula
    ref = make_model()
    calplug.enable(ref)
    w = torch.cat([ref(**mb).cal_weights[mb["labels"][:, 1:] != -100] for mb in micro])
    for rec in ranks:
        assert rec["log"]["cal/tokens"] == w.numel() == sum(counts)
        assert rec["log"]["cal/mean_weight"] == pytest.approx(float(w.mean()), abs=1e-5)
