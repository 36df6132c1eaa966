"""LLaMA-Factory as users run it at scale (tox -e llamafactory-scale, not in CI): two CPU processes
over gloo through its launch convention (``FORCE_TORCHRUN=1 NPROC_PER_NODE=2``, which ``calplug
llamafactory train`` honours as ``llamafactory-cli`` does) and through calplug's torchrun entry,
LoRA, and DeepSpeed ZeRO-2 / ZeRO-3 from the YAML's ``deepspeed:`` key.

Every run reads the same 12 samples in order (``disable_shuffling``): two per micro-batch, dealt
to the ranks in turn, so at step 1 rank 1's micro-batch is text-only (LLaMA-Factory then adds its
placeholder image, masked out, so that every rank runs the vision tower) and rank 0's has images.
SGD without clipping makes each update linear in the gradient, so runs compare exactly: the two-
process run equals one process accumulating the same two micro-batches per step (LLaMA-Factory
averages micro-batch losses, over accumulation and over ranks alike), and ZeRO-2 / ZeRO-3 equal
that run.
"""
from __future__ import annotations

import json

import pytest
import yaml

from _skips import importorskip  # noqa: E402  (skips only where the package itself is missing)

importorskip("llamafactory", "llamafactory", "run tox -e llamafactory-scale (LLaMA-Factory)")
importorskip("deepspeed", "deepspeed", "run tox -e llamafactory-scale")

import _exact  # noqa: E402
import _tiny  # noqa: E402
from conftest import BIN, run, tail  # noqa: E402

STEPS = 3
SETTINGS = {"alpha": 0.0}   # a random tiny model's gaps are ~0.01: with alpha 1 every weight is 1
TIMEOUT = 600               # a hang (ranks running different modules under ZeRO-3) fails here


def config(root, model, data, name, **extra) -> str:
    values = dict(
        model_name_or_path=str(model), stage="sft", do_train=True, finetuning_type="full",
        dataset="tiny_mm", dataset_dir=str(data), template="llava", cutoff_len=128,
        overwrite_cache=True, preprocessing_num_workers=1, dataloader_num_workers=0,
        output_dir=str(root / name), logging_steps=1, save_strategy="no", overwrite_output_dir=True,
        report_to="none", per_device_train_batch_size=2, gradient_accumulation_steps=1,
        optim="sgd", learning_rate=0.1, max_grad_norm=0.0, max_steps=STEPS,
        lr_scheduler_type="constant", bf16=False, use_cpu=True, seed=0, disable_shuffling=True,
        cal=True, cal_alpha=SETTINGS["alpha"])
    values.update(extra)
    values = {k: v for k, v in values.items() if v is not None}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamafactory-scale")
    model = _tiny.build_model_folder(root / "tiny-llava")
    data = _tiny.write_llamafactory_data(root / "data", pattern=_tiny.MIXED)
    return root, model, data


@pytest.fixture(scope="module")
def one_process(setup):
    """The reference: one process, two micro-batches accumulated per step (the global batch)."""
    root, model, data = setup
    result = run([str(BIN / "calplug"), "llamafactory", "train",
                  config(root, model, data, "one", gradient_accumulation_steps=2)], root,
                 timeout=TIMEOUT, **_exact.recording(root / "rec-one"))
    assert result.returncode == 0, tail(result.stdout)
    return _exact.read(root / "rec-one")


@pytest.fixture(scope="module")
def two_processes(setup):
    """``FORCE_TORCHRUN=1 NPROC_PER_NODE=2 calplug llamafactory train cfg.yaml``."""
    root, model, data = setup
    result = run([str(BIN / "calplug"), "llamafactory", "train",
                  config(root, model, data, "ddp", ddp_backend="gloo")], root, timeout=TIMEOUT,
                 FORCE_TORCHRUN="1", NPROC_PER_NODE="2", **_exact.recording(root / "rec-ddp"))
    assert result.returncode == 0, tail(result.stdout)
    return result, _exact.read(root / "rec-ddp")


def image_token(model_dir) -> int:
    return json.loads((model_dir / "config.json").read_text())["image_token_index"]


def assert_two_rank_run(record, model_dir) -> None:
    """CAL on both ranks at every step, the ``cal/`` statistics summed over both ranks (the same
    on each, counting both ranks' supervised rows), rank 1 text-only at step 1."""
    _exact.assert_ranks_log_cal(record, STEPS)
    for rank in record.ranks:
        for log in record.logs[rank]:
            assert 0.0 <= log["cal/mean_weight"] < 0.5, log   # alpha 0: CAL's weights, not 1
    token = image_token(model_dir)
    assert _exact.attended_image_positions(record.calls[1][0]["kwargs"], token) == [0, 0]
    assert min(_exact.attended_image_positions(record.calls[0][0]["kwargs"], token)) > 0
    assert record.logs[0][0]["cal/share_contrasted"] < 1.0   # rank 1's rows got no contrast


def test_two_processes_equal_one_process_on_the_same_global_batch(setup, one_process, two_processes):
    root, model, _ = setup
    result, ddp = two_processes
    assert "calplug llamafactory: torchrun --nnodes 1 --node_rank 0 --nproc_per_node 2" \
        in result.stdout, tail(result.stdout)
    assert_two_rank_run(ddp, model)
    _exact.assert_two_ranks_equal_one_process(ddp, one_process, model, SETTINGS, STEPS)


def test_lora_through_calplugs_torchrun_entry(setup):
    """``torchrun --nproc_per_node 2 -m calplug.cli.llamafactory train cfg.yaml`` with LoRA:
    CAL enabled on the Llava inside the PEFT model, only the adapters trainable and with a
    gradient, CAL active, and the first step's loss calplug's on the base model (LoRA's B
    starts at 0)."""
    root, model, data = setup
    cfg = config(root, model, data, "lora", finetuning_type="lora", lora_target="all", lora_rank=4,
                 ddp_backend="gloo")
    result = run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
                  "-m", "calplug.cli.llamafactory", "train", cfg], root, timeout=TIMEOUT,
                 **_exact.recording(root / "rec-lora"))
    assert result.returncode == 0, tail(result.stdout)
    record = _exact.read(root / "rec-lora")
    assert_two_rank_run(record, model)
    for rank in record.ranks:
        facts = record.model[rank]
        assert facts["enabled_types"] == ["LlavaForConditionalGeneration"], facts["enabled"]
        assert facts["enabled"] == ["module.base_model.model"], facts["enabled"]  # DDP > PEFT > Llava
        assert facts["trainable"] and all("lora_" in n for n in facts["trainable"]), facts["trainable"]
        assert any("language_model" in n and "lora_" not in n for n in facts["frozen"])
        grads = facts["grads"]
        assert set(grads) <= set(facts["trainable"]) and any("lora_B" in n and g > 0 for n, g in grads.items())
    pairs = _exact.assert_first_step_exact(record, model, SETTINGS)
    print("\n".join(_exact.log_lines(result.stdout)))
    print("LoRA step 1 per rank (recorded, recomputed on the base model):", pairs)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_through_llamafactory(setup, two_processes, stage):
    """The YAML's ``deepspeed:`` key, two CPU ranks, rank 1 text-only at step 1: no hang, CAL on
    both ranks, every step's loss that of the two-process DDP run (= one process). On CPU the
    YAML must not say ``use_cpu: true``: accelerate then skips DeepSpeed's process group, and
    DeepSpeed counts one process (its batch-size check fails: 4 != 2 * 1 * 1)."""
    root, model, data = setup
    cfg = config(root, model, data, f"zero{stage}", deepspeed=_exact.zero_config(root, stage),
                 ddp_backend="gloo", use_cpu=None)
    result = run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
                  "-m", "calplug.cli.llamafactory", "train", cfg], root, timeout=TIMEOUT,
                 DS_ACCELERATOR="cpu", **_exact.recording(root / f"rec-zero{stage}"))
    assert result.returncode == 0, tail(result.stdout)
    record = _exact.read(root / f"rec-zero{stage}")
    assert {c["module"] for r in record.ranks for c in record.calls[r]} == {"DeepSpeedEngine"}
    assert_two_rank_run(record, model)
    _exact.assert_same_losses(record, two_processes[1], rel=1e-5)
    _exact.assert_first_step_exact(record, model, SETTINGS)
    print("\n".join(_exact.log_lines(result.stdout)))
    print(f"ZeRO-{stage} losses:", record.losses(0), "DDP:", two_processes[1].losses(0))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
