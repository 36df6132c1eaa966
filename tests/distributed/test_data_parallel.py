"""Two-rank data-parallel CAL training on CPU (gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3.

Each test launches two real processes (tests/distributed/_worker.py; the two DDP cases share one
launch, each trained on a fresh model) and compares them with one process training on the same
micro-batches (tests/distributed/_common.py): the CAL loss and gaps of
step 0 on each rank, the losses of step 1, and every parameter after two SGD steps, all to `TOL`
(1e-5 absolute, as the FSDP tests; the largest difference measured is ~1e-6, docs/distributed.md).
ZeRO-3 runs with ``stage3_param_persistence_threshold: 0``, so every parameter is partitioned; the
worker records that each parameter's local copy is empty outside forward and that calplug's
`distributed.gathered` gives the full ``lm_head``. The "mixed" case gives rank 1 a text-only
micro-batch (no pixels) while rank 0 has images: under ZeRO-3 both ranks must still run the
contrast pass (calplug.distributed.any_rank + contrast.placeholder_plan), and a negative control
shows that without that agreement the job dies on a collective mismatch.
"""
from __future__ import annotations

import functools

import pytest
import torch

import _common
from _launch import describe, launch, launch_deepspeed
from _skips import module_found, needs

pytestmark = [
    pytest.mark.slow,
    # The max parameter difference goes into the junit XML (CI results) as a test property.
    pytest.mark.filterwarnings("ignore:record_property is incompatible"),
]

needs_gloo = needs(
    "gloo", torch.distributed.is_available() and torch.distributed.is_gloo_available(),
    "needs torch.distributed with the gloo backend (this torch build has none)")
needs_deepspeed = needs(
    "deepspeed", module_found("deepspeed"),
    "deepspeed is not installed (pip install deepspeed; DS_BUILD_OPS=0 is enough on CPU): tox -e distributed")


TOL = 1e-5


@functools.lru_cache(maxsize=None)
def reference(case, contrast="drop"):
    torch.manual_seed(0)
    return _common.reference_run(case, contrast=contrast)


def run_ranks(tmp_path, mode, case, *extra, timeout=240.0, launcher="popen"):
    start = launch_deepspeed if launcher == "deepspeed" else launch
    return start(["--mode", mode, "--case", case, *extra], tmp_path, timeout=timeout)


def check_against_reference(tmp_path, mode, case, launcher="popen", record=lambda k, v: None,
                            contrast="drop", result=None):
    """Launch the ranks (or take ``result``, a launch that wrote this case into ``tmp_path``) and
    compare them with one process."""
    if result is None:
        result = run_ranks(tmp_path, mode, case, "--contrast", contrast, launcher=launcher)
    assert not result["timed_out"] and set(result["returncodes"]) == {0}, describe(result)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(_common.WORLD)]
    params = torch.load(tmp_path / "params.pt")
    ref_losses, ref_deltas, ref_params = reference(case, contrast)
    for r, rec in enumerate(ranks):
        # Step 0: same model, same micro-batch: the CAL loss and every gap as in one process.
        assert rec["losses"][0] == pytest.approx(ref_losses[0][r], abs=TOL), (r, rec["losses"])
        torch.testing.assert_close(rec["deltas"][0], ref_deltas[0][r], atol=TOL, rtol=0)
        # Step 1 runs on the parameters the data-parallel update produced.
        assert rec["losses"][1] == pytest.approx(ref_losses[1][r], abs=TOL), (r, rec["losses"])
    assert set(params) == set(ref_params)
    worst = max(float((params[n] - p).abs().max()) for n, p in ref_params.items())
    record("max_param_diff_vs_single_process", worst)
    assert worst < TOL, f"largest parameter difference {worst:.3g} > {TOL}"
    moved = max(float((params[n] - p.detach()).abs().max())
                for n, p in _common.make_model().named_parameters() if n in params)
    assert moved > 1e-2  # training really changed the parameters
    return ranks


DDP_CASES = ("images", "mixed")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Both DDP cases from one launch: each rank trains them in turn, a fresh model each
    (tests/distributed/_worker.py), so the two ranks start once."""
    out = tmp_path_factory.mktemp("ddp")
    return out, run_ranks(out, "ddp", ",".join(DDP_CASES), "--contrast", "drop")


@needs_gloo
@pytest.mark.parametrize("case", DDP_CASES)
def test_ddp_matches_single_process(ddp_run, case, record_property):
    out, result = ddp_run
    ranks = check_against_reference(out / case, "ddp", case, record=record_property, result=result)
    assert not any(r["sharded"] for r in ranks)
    if case == "mixed":
        assert torch.count_nonzero(ranks[1]["deltas"][0]) == 0  # text-only rank: all gaps 0
        assert torch.count_nonzero(ranks[0]["deltas"][0]) > 0


@needs_gloo
@needs_deepspeed
def test_zero2_matches_single_process_with_a_text_only_rank(tmp_path, record_property):
    check_against_reference(tmp_path, "zero2", "mixed", record=record_property)


@needs_gloo
@needs_deepspeed
@pytest.mark.parametrize("case", ["images", "mixed"])
def test_zero3_partitions_and_matches_single_process(tmp_path, case, record_property):
    # The mixed case goes through DeepSpeed's own launcher (`deepspeed --num_gpus 2 ...`).
    ranks = check_against_reference(tmp_path, "zero3", case,
                                    launcher="deepspeed" if case == "mixed" else "popen",
                                    record=record_property)
    for rec in ranks:
        assert rec["sharded"]
        assert rec["empty_outside_forward"] == [True] * _common.STEPS
        assert rec["shard_fraction"] == [pytest.approx(1 / _common.WORLD, abs=0.05)] * _common.STEPS
        assert rec["head_shape_outside"] == (0,)  # what a direct read of lm_head.weight sees
        assert rec["head_shape_gathered"] == (256, 64)


@needs_gloo
@needs_deepspeed
def test_zero3_text_only_rank_without_agreement_dies_on_a_collective_mismatch(tmp_path):
    """Negative control for the mixed case: if each rank decided alone (rank 1 has nothing to
    contrast, so it would skip the contrast pass), ZeRO-3's parameter gathers pair up wrongly."""
    result = run_ranks(tmp_path, "zero3", "mixed", "--no-agree", "--timeout", "30", timeout=150.0)
    assert result["timed_out"] or any(rc != 0 for rc in result["returncodes"]), describe(result)
    text = "\n".join(result["logs"])
    assert result["timed_out"] or any(s in text for s in (
        "collective mismatch", "Connection reset", "Timed out", "timeout", "doesn't match")), describe(result)


@needs_gloo
@needs_deepspeed
def test_zero3_blur_matches_single_process(tmp_path, record_property):
    """contrast='blur' runs the vision tower a second time (on blurred pixels) inside the contrast
    pass: under ZeRO-3 both ranks do, gathering the same parameters, and the result is the
    single-process one."""
    ranks = check_against_reference(tmp_path, "zero3", "images", contrast="blur",
                                    record=record_property)
    assert all(torch.count_nonzero(r["deltas"][0]) > 0 for r in ranks)


@needs_gloo
@needs_deepspeed
def test_zero3_blur_with_a_text_only_rank_stops_every_rank_with_the_fix(tmp_path):
    """Rank 1 has no pixels, so it cannot re-run the vision tower that rank 0's blur runs: both
    ranks learn it from the agreement and raise the same error, instead of hanging in a gather."""
    result = run_ranks(tmp_path, "zero3", "mixed", "--contrast", "blur", "--timeout", "60",
                       timeout=150.0)
    assert not result["timed_out"], describe(result)
    assert all(rc != 0 for rc in result["returncodes"]), describe(result)
    assert all("no pixel values" in log and "dummy image" in log for log in result["logs"]), \
        describe(result)
