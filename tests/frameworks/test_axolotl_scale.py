"""axolotl as users run it at scale (tox -e axolotl-scale, not in CI): two CPU processes over gloo
through its accelerate launch (``axolotl train cfg.yml --launcher accelerate -- --multi_gpu
--num_processes 2``), full fine-tuning and LoRA.

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
"""
from __future__ import annotations

import json

import pytest
import yaml

from _skips import importorskip  # noqa: E402  (skips only where the package itself is missing)

importorskip("axolotl", "axolotl", "run tox -e axolotl-scale")

import _exact  # noqa: E402
import _tiny  # noqa: E402
from conftest import BIN, run, tail  # noqa: E402

STEPS = 3
SETTINGS = {"alpha": 0.0}   # a random tiny model's gaps are ~0.01: with alpha 1 every weight is 1
TIMEOUT = 900
PLUGIN = "calplug.frameworks.axolotl.CALPlugin"
CPU_RANKS = dict(ACCELERATE_USE_CPU="true", CALPLUG_TEST_CPU_RANKS="axolotl")


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


def image_token(model_dir) -> int:
    return json.loads((model_dir / "config.json").read_text())["image_token_index"]


def assert_two_rank_run(record, model_dir) -> None:
    _exact.assert_ranks_log_cal(record, STEPS)
    for rank in record.ranks:
        assert {c["module"] for c in record.calls[rank]} == {"DistributedDataParallel"}
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


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
