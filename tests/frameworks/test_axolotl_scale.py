"""axolotl as users run it at scale (tox -e axolotl-scale, not in CI): two CPU processes over gloo
through its accelerate launch (``axolotl train cfg.yml --launcher accelerate -- --multi_gpu
--num_processes 2``), full fine-tuning, LoRA, and DeepSpeed ZeRO-2 / ZeRO-3 from the YAML's
``deepspeed:`` key.

On CPU ranks axolotl needs two things it does not do itself (it assumes a GPU per rank):
accelerate's ``ACCELERATE_USE_CPU=true`` (axolotl has no ``use_cpu`` key; the HF Trainer reads
the variable as ``use_cpu``, so the ranks join a gloo process group), and a test-only shim
(recorder/cpu_ranks.py) that maps the model of each rank to the CPU where axolotl's
``normalize_config`` names CUDA device ``LOCAL_RANK``. Neither changes how axolotl trains.

Every run reads the same 12 samples in order (``curriculum_sampling``: a sequential sampler), two
per micro-batch, dealt to the ranks in turn: at step 1 rank 1's micro-batch is text-only (axolotl
adds no placeholder image, so that rank never runs the vision tower: DDP then needs
``ddp_find_unused_parameters: true``, with or without CAL). SGD without clipping makes updates
linear in the gradient, so the two-process run equals one process accumulating the same two
micro-batches per step (axolotl averages micro-batch losses, over accumulation and ranks alike).

DeepSpeed on CPU ranks: ``DS_ACCELERATOR=cpu``, no ``ACCELERATE_USE_CPU`` (with it accelerate
leaves DeepSpeed out and the Trainer runs DDP without a word), and the shim's second part: from
1.13 on accelerate counts one process on CPU ranks under DeepSpeed (recorder/cpu_ranks.py,
`deepspeed_cpu_ranks`). A rank whose micro-batch has no image skips the vision tower (axolotl adds
no placeholder image), with or without CAL: under ZeRO-2 its gradient buckets then miss the vision
parameters and the reduction mismatches, unless they are frozen (axolotl's ``freeze_mm_modules``,
which the ZeRO-2 test sets, with rank 1 text-only at step 1); under ZeRO-3 the ranks gather
different parameters in the forward whatever is frozen, so the ZeRO-3 test deals every rank a
micro-batch with an image (and a text-only sample in it) at every step.
"""
from __future__ import annotations

import json

import pytest
import yaml

from _skips import importorskip  # noqa: E402  (skips only where the package itself is missing)

importorskip("axolotl", "axolotl", "run tox -e axolotl-scale")

import _exact  # noqa: E402
import _tiny  # noqa: E402
from _skips import module_found, needs  # noqa: E402
from conftest import BIN, run, tail  # noqa: E402

STEPS = 3
SETTINGS = {"alpha": 0.0}   # a random tiny model's gaps are ~0.01: with alpha 1 every weight is 1
TIMEOUT = 900
PLUGIN = "calplug.frameworks.axolotl.CALPlugin"
CPU_RANKS = dict(ACCELERATE_USE_CPU="true", CALPLUG_TEST_CPU_RANKS="axolotl")
ZERO_RANKS = dict(DS_ACCELERATOR="cpu", CALPLUG_TEST_CPU_RANKS="axolotl")   # no ACCELERATE_USE_CPU
# Two samples a micro-batch, dealt to the ranks in turn: every micro-batch has an image and a
# text-only sample, except (image, image) for rank 0 at step 2 (ZeRO-3 needs the vision tower on
# every rank at every step).
IMAGE_ON_EVERY_RANK = (True, False, False, True, True, True, True, False, False, True, True, False)
needs_deepspeed = needs("deepspeed", module_found("deepspeed"),
                        "DeepSpeed is not installed: run tox -e axolotl-scale")


def config(root, model, data, name, **extra) -> str:
    values = dict(
        base_model=str(model), processor_type="AutoProcessor", skip_prepare_dataset=True,
        remove_unused_columns=False, chat_template="tokenizer_default",
        datasets=[dict(path=str(data), ds_type="json", type="chat_template", field_messages="messages")],
        dataset_prepared_path=str(root / "prepared"), val_set_size=0.0, output_dir=str(root / name),
        sequence_len=128, micro_batch_size=2, gradient_accumulation_steps=1, max_steps=STEPS,
        num_epochs=1, optimizer="sgd", lr_scheduler="constant", learning_rate=0.1, max_grad_norm=0.0,
        warmup_steps=0, bf16=False, fp16=False, tf32=False, logging_steps=1, save_strategy="no",
        seed=0, dataloader_num_workers=0, curriculum_sampling=True, shuffle_merged_datasets=False,
        ddp_find_unused_parameters=True, plugins=[PLUGIN], cal=True, cal_alpha=SETTINGS["alpha"])
    values.update(extra)
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def launch(cfg) -> list[str]:
    return [str(BIN / "axolotl"), "train", cfg, "--launcher", "accelerate", "--",
            "--multi_gpu", "--num_processes", "2", "--main_process_port", str(_free_port())]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("axolotl-scale")
    model = _tiny.build_model_folder(root / "tiny-llava")
    data = _tiny.write_axolotl_data(root / "data", pattern=_tiny.MIXED)
    return root, model, data


@pytest.fixture(scope="module")
def one_process(setup):
    root, model, data = setup
    result = run([str(BIN / "axolotl"), "train", config(root, model, data, "one",
                                                        gradient_accumulation_steps=2)],
                 root, timeout=TIMEOUT, **_exact.recording(root / "rec-one"))
    assert result.returncode == 0, tail(result.stdout)
    return _exact.read(root / "rec-one")


@pytest.fixture(scope="module")
def one_process_frozen(setup):
    """The ZeRO-2 reference: one process on the global batch, ``freeze_mm_modules: true``."""
    root, model, data = setup
    result = run([str(BIN / "axolotl"), "train", config(root, model, data, "one-frozen",
                                                        gradient_accumulation_steps=2,
                                                        freeze_mm_modules=True)],
                 root, timeout=TIMEOUT, **_exact.recording(root / "rec-one-frozen"))
    assert result.returncode == 0, tail(result.stdout)
    return _exact.read(root / "rec-one-frozen")


@pytest.fixture(scope="module")
def image_on_every_rank(setup):
    """The ZeRO-3 data (`IMAGE_ON_EVERY_RANK`) and its reference: one process on the global batch."""
    root, model, _ = setup
    data = _tiny.write_axolotl_data(root / "data-images", pattern=IMAGE_ON_EVERY_RANK)
    result = run([str(BIN / "axolotl"), "train", config(root, model, data, "one-images",
                                                        gradient_accumulation_steps=2)],
                 root, timeout=TIMEOUT, **_exact.recording(root / "rec-one-images"))
    assert result.returncode == 0, tail(result.stdout)
    return data, _exact.read(root / "rec-one-images")


def image_token(model_dir) -> int:
    return json.loads((model_dir / "config.json").read_text())["image_token_index"]


def assert_two_rank_run(record, model_dir, module: str = "DistributedDataParallel") -> None:
    _exact.assert_ranks_log_cal(record, STEPS)
    for rank in record.ranks:
        assert {c["module"] for c in record.calls[rank]} == {module}
    first = [record.calls[r][0]["kwargs"] for r in record.ranks]
    assert first[1].get("pixel_values") is None                          # rank 1: text-only
    assert min(_exact.attended_image_positions(first[0], image_token(model_dir))) > 0
    assert 0.0 < record.logs[0][0]["cal/mean_weight"] < 0.5             # alpha 0: CAL's weights


def test_two_processes_equal_one_process_on_the_same_global_batch(setup, one_process):
    root, model, data = setup
    result = run(launch(config(root, model, data, "ddp")), root, timeout=TIMEOUT, **CPU_RANKS,
                 **_exact.recording(root / "rec-ddp"))
    assert result.returncode == 0, tail(result.stdout)
    ddp = _exact.read(root / "rec-ddp")
    assert_two_rank_run(ddp, model)
    _exact.assert_two_ranks_equal_one_process(ddp, one_process, model, SETTINGS, STEPS)


def test_lora_through_axolotls_launch(setup):
    """axolotl's LoRA (``adapter: lora``): CAL enabled on the Llava inside the PEFT model (the
    plugin's post_model_load runs after the adapters are applied), only the adapters trainable and
    with a gradient, CAL active, the first step's loss calplug's on the base model."""
    root, model, data = setup
    # axolotl's fused LoRA kernels look for a LlavaAttention class transformers 5 does not have
    cfg = config(root, model, data, "lora", adapter="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                 lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False,
                 lora_target_modules=r"model.language_model.layers.[\d]+.(mlp|self_attn).(up|down|gate|q|k|v|o)_proj")
    result = run(launch(cfg), root, timeout=TIMEOUT, **CPU_RANKS, **_exact.recording(root / "rec-lora"))
    assert result.returncode == 0, tail(result.stdout)
    record = _exact.read(root / "rec-lora")
    assert_two_rank_run(record, model)
    for rank in record.ranks:
        facts = record.model[rank]
        assert facts["enabled_types"] == ["LlavaForConditionalGeneration"], facts["enabled"]
        assert facts["enabled"] == ["module.base_model.model"], facts["enabled"]  # DDP > PEFT > Llava
        assert facts["trainable"] and all("lora_" in n for n in facts["trainable"]), facts["trainable"]
        grads = facts["grads"]
        assert set(grads) <= set(facts["trainable"]) and any("lora_B" in n and g > 0 for n, g in grads.items())
    pairs = _exact.assert_first_step_exact(record, model, SETTINGS)
    for rank in record.ranks:
        print(f"LoRA rank {rank}:", [{k: v for k, v in log.items() if k == "loss" or k.startswith("cal/")}
                                     for log in record.logs[rank]])
    print("LoRA step 1 per rank (recorded, recomputed on the base model):", pairs)


@needs_deepspeed
def test_deepspeed_zero2_with_a_text_only_rank(setup, one_process_frozen):
    """ZeRO-2 from the YAML's ``deepspeed:`` key, rank 1 text-only at step 1 (its vision tower
    does not run), vision tower and projector frozen (``freeze_mm_modules``): no hang, CAL on both
    ranks, every step's loss the one process's on the same global batch."""
    root, model, data = setup
    cfg = config(root, model, data, "zero2", deepspeed=_exact.zero_config(root, 2),
                 freeze_mm_modules=True)
    result = run(launch(cfg), root, timeout=TIMEOUT, **ZERO_RANKS, **_exact.recording(root / "rec-zero2"))
    assert result.returncode == 0, tail(result.stdout)
    record = _exact.read(root / "rec-zero2")
    assert_two_rank_run(record, model, module="DeepSpeedEngine")
    _exact.assert_two_ranks_equal_one_process(record, one_process_frozen, model, SETTINGS, STEPS)
    print("\n".join(_exact.log_lines(result.stdout)))
    print("ZeRO-2 losses:", record.losses(0), "1 process:", one_process_frozen.losses(0))


@needs_deepspeed
def test_deepspeed_zero3_with_text_only_samples(setup, image_on_every_rank):
    """ZeRO-3 (parameters partitioned down to the tiny model's, vision tower trained), each rank's
    micro-batch an image sample and a text-only one at steps 1 and 3: no hang, CAL on both ranks
    (contrasting only the image rows), every step's loss the one process's."""
    root, model, _ = setup
    data, reference = image_on_every_rank
    cfg = config(root, model, data, "zero3", deepspeed=_exact.zero_config(root, 3))
    result = run(launch(cfg), root, timeout=TIMEOUT, **ZERO_RANKS, **_exact.recording(root / "rec-zero3"))
    assert result.returncode == 0, tail(result.stdout)
    record = _exact.read(root / "rec-zero3")
    _exact.assert_ranks_log_cal(record, STEPS)
    token = image_token(model)
    for rank in record.ranks:
        assert {c["module"] for c in record.calls[rank]} == {"DeepSpeedEngine"}
        assert all(c["kwargs"].get("pixel_values") is not None for c in record.calls[rank])
        positions = _exact.attended_image_positions(record.calls[rank][0]["kwargs"], token)
        assert sorted(p > 0 for p in positions) == [False, True], (rank, positions)
    assert 0.0 < record.logs[0][0]["cal/share_contrasted"] < 1.0      # the text-only rows: none
    assert 0.0 < record.logs[0][0]["cal/mean_weight"] < 0.5           # alpha 0: CAL's weights
    _exact.assert_two_ranks_equal_one_process(record, reference, model, SETTINGS, STEPS)
    print("\n".join(_exact.log_lines(result.stdout)))
    print("ZeRO-3 losses:", record.losses(0), "1 process:", reference.losses(0))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
