"""ms-swift as users run it at scale (tox -e swift-scale, not in CI): two CPU processes over gloo
through its own launch (``NPROC_PER_NODE=2 swift sft ...``, which relaunches itself with torchrun),
full fine-tuning and LoRA (``--tuner_type lora``).

Every run reads the same 12 samples in order (``--dataset_shuffle false
--train_dataloader_shuffle false``). ms-swift deals *samples* to the ranks in turn (rank r reads
samples r, r + 2, ...), so the two-process run reads them in an order that gives rank r at step s
the samples the one-process run reads as its micro-batch 2s + r: the same global batch, split the
same way. At step 1 rank 1's micro-batch is text-only. SGD without clipping makes updates linear in the gradient, so
the runs must log the same loss at every step. (Every micro-batch here has 12 supervised tokens, so
ms-swift's token weighting of micro-batches, when the Trainer hands it a token count, and a plain
mean coincide: the logged loss is the mean of the micro-batch CAL losses either way.)
"""
from __future__ import annotations

import json

import pytest

from _skips import importorskip  # noqa: E402  (skips only where the package itself is missing)

importorskip("swift", "swift", "run tox -e swift-scale (ms-swift)")

import _exact  # noqa: E402
import _tiny  # noqa: E402
from conftest import BIN, run, tail  # noqa: E402

from calplug.frameworks import swift as adapter  # noqa: E402

STEPS = 3
SETTINGS = {"alpha": 0.0}
TIMEOUT = 900
GLOO = ("--ddp_backend", "gloo")   # two CPU ranks (one process must not name a backend)


def sft(model, dataset, out, *extra) -> list[str]:
    return [str(BIN / "swift"), "sft", "--model", str(model), "--model_type", "llava1_5_hf",
            "--template", "llava1_5_hf", "--dataset", str(dataset), "--split_dataset_ratio", "0",
            "--dataset_shuffle", "false", "--train_dataloader_shuffle", "false",
            "--tuner_type", "full", "--torch_dtype", "float32", "--max_length", "128",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--optim", "sgd", "--learning_rate", "0.1", "--max_grad_norm", "0",
            "--lr_scheduler_type", "constant", "--warmup_ratio", "0", "--max_steps", str(STEPS),
            "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
            "--dataloader_num_workers", "0", "--dataset_num_proc", "1", "--check_model", "false",
            "--use_cpu", "true", "--ddp_find_unused_parameters", "true",
            "--output_dir", str(out), "--external_plugins", adapter.plugin_path(), "--callbacks", "cal",
            *extra]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("swift-scale")
    model = _tiny.build_model_folder(root / "tiny-llava")
    data = _tiny.write_swift_data(root / "data", pattern=_tiny.MIXED)
    records = data.read_text().splitlines()
    dealt = [records[4 * s + i] for s in range(len(records) // 4) for i in (0, 2, 1, 3)]
    (root / "data" / "dealt.jsonl").write_text("\n".join(dealt) + "\n")
    settings = root / "cal.yaml"
    settings.write_text("alpha: 0.0\n")
    return root, model, data, settings


def dealt(data):
    """The dataset in the order ms-swift's two ranks read it as the one process's micro-batches."""
    return data.parent / "dealt.jsonl"


@pytest.fixture(scope="module")
def one_process(setup):
    root, model, data, settings = setup
    result = run(sft(model, data, root / "one", "--gradient_accumulation_steps", "2"), root,
                 timeout=TIMEOUT, CALPLUG_CONFIG=str(settings), **_exact.recording(root / "rec-one"))
    assert result.returncode == 0, tail(result.stdout)
    return _exact.read(root / "rec-one")


def image_token(model_dir) -> int:
    return json.loads((model_dir / "config.json").read_text())["image_token_index"]


def assert_two_rank_run(record, model_dir) -> None:
    _exact.assert_ranks_log_cal(record, STEPS)
    token = image_token(model_dir)
    assert max(_exact.attended_image_positions(record.calls[1][0]["kwargs"], token)) == 0  # text-only
    assert min(_exact.attended_image_positions(record.calls[0][0]["kwargs"], token)) > 0
    assert 0.0 < record.logs[0][0]["cal/mean_weight"] < 0.5


def test_two_processes_equal_one_process_on_the_same_global_batch(setup, one_process):
    root, model, data, settings = setup
    result = run(sft(model, dealt(data), root / "ddp", *GLOO), root, timeout=TIMEOUT, NPROC_PER_NODE="2",
                 MASTER_PORT=str(_free_port()), CALPLUG_CONFIG=str(settings),
                 **_exact.recording(root / "rec-ddp"))
    assert result.returncode == 0, tail(result.stdout)
    assert "torch.distributed.run --nproc_per_node 2" in result.stdout
    ddp = _exact.read(root / "rec-ddp")
    assert_two_rank_run(ddp, model)
    _exact.assert_two_ranks_equal_one_process(ddp, one_process, model, SETTINGS, STEPS)


def test_lora_through_swifts_launch(setup):
    root, model, data, settings = setup
    cmd = sft(model, dealt(data), root / "lora", *GLOO)
    cmd[cmd.index("--tuner_type") + 1] = "lora"
    cmd += ["--lora_rank", "4", "--lora_alpha", "8", "--target_modules", "all-linear",
            "--freeze_vit", "true"]
    result = run(cmd, root, timeout=TIMEOUT, NPROC_PER_NODE="2", MASTER_PORT=str(_free_port()),
                 CALPLUG_CONFIG=str(settings), **_exact.recording(root / "rec-lora"))
    assert result.returncode == 0, tail(result.stdout)
    record = _exact.read(root / "rec-lora")
    assert_two_rank_run(record, model)
    for rank in record.ranks:
        facts = record.model[rank]
        assert facts["enabled_types"] == ["LlavaForConditionalGeneration"], facts["enabled"]
        assert facts["trainable"] and all("lora_" in n for n in facts["trainable"]), facts["trainable"]
        grads = facts["grads"]
        assert set(grads) <= set(facts["trainable"]) and any("lora_B" in n and g > 0 for n, g in grads.items())
        call = record.calls[rank][0]
        assert call["loss"] == pytest.approx(_exact.cal_loss(model, call["kwargs"], **SETTINGS), rel=2e-6)
    for rank in record.ranks:
        print(f"LoRA rank {rank}:", [{k: v for k, v in log.items() if k == "loss" or k.startswith("cal/")}
                                     for log in record.logs[rank]])


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
