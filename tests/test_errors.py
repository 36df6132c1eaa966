"""Bad input never trains silently wrong (docs/errors.md): each case is a clear error naming the
problem and the fix, or a documented behaviour checked here.

* settings: non-finite numbers, degenerate ranges, YAML errors naming file, line and column, a
  folder given as a config file, YAML files with sections;
* the model argument: None, a hub name, a class, a trainer, torch.compile, nn.DataParallel;
* an enabled model pickles, deep-copies and goes through torch.save / torch.load enabled;
* batches: float or 1-D labels, ids outside the vocabulary, sequences of length 1, batches with
  no supervised token, non-finite gaps (a NaN pixel, a non-finite contrast pass);
* the fork-patch engine never writes outside its tree and applies all or nothing;
* the commands: `inspect` on a folder that is not a model, `bench` options out of range.
"""
from __future__ import annotations

import copy
import io
import os
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import calplug
from calplug import CALConfig, CALConfigError, CALError, CALInputError, CALWarning, UnsupportedModelError
from calplug import contrast_pass, patching
from calplug.config import resolve_config
from calplug.testing import llava_batch, tiny_llava
from calplug.trainer import CALStats
from _skips import missing


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Each test sees calplug's one-time warnings as if nothing had been shown yet."""
    monkeypatch.setattr(calplug.errors, "_WARNED", set())


@pytest.fixture
def stats():
    s = CALStats().register()
    yield s
    s.unregister()


# -- settings ------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value", [
    ("alpha", float("nan")), ("alpha", float("inf")), ("beta", float("nan")), ("beta", float("inf")),
    ("beta", float("-inf")), ("mask_ratio", float("nan")), ("blur_sigma", float("inf")),
    ("blur_sigma", float("nan")),
])
def test_non_finite_numbers_are_refused(key, value):
    with pytest.raises(CALConfigError, match=rf"{key} must be a finite number, got {value}.*e\.g\. {key}="):
        CALConfig(**{key: value})


def test_nan_alpha_is_refused_by_enable_before_any_step(model):
    with pytest.raises(CALConfigError, match="alpha must be a finite number, got nan"):
        calplug.enable(model, alpha=float("nan"))
    assert not calplug.is_enabled(model)


def test_a_zero_clamp_range_is_refused():
    with pytest.raises(CALConfigError, match=r"beta must be > 0.*every loss weight is 0.*nothing trains.*alpha=1\.0, beta=5\.0"):
        CALConfig(alpha=0, beta=0)
    assert CALConfig(alpha=0.0, beta=0.5).beta == 0.5     # alpha = 0 alone is a valid setting
    assert CALConfig(alpha=2.0, beta=2.0).alpha == 2.0    # alpha = beta: constant weights, plain CE


@pytest.mark.parametrize("kwargs, words", [
    ({"alpha": -1.0}, r"alpha must be >= 0.*e\.g\. alpha=1\.0"),
    ({"pool_window": 2}, r"pool_window must be a positive odd integer.*e\.g\. pool_window=3"),
    ({"pool_window": 3.0}, r"pool_window must be a positive odd integer.*got 3\.0"),
    ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*63\)"),
    ({"loss_chunk": -8}, r"loss_chunk must be an integer >= 0"),
    ({"stages": "finetuning"}, r"stages must be one of.*Did you mean 'finetune'"),
    ({"pool_scope": None}, r"pool_scope must be one of"),
    ({"contrast": ["drop"]}, r"contrast must be the name of a contrast condition, got \['drop'\]"),
    ({"alpha": True}, r"alpha must be a number, got True"),
])
def test_other_invalid_values_name_the_setting_and_a_valid_example(kwargs, words):
    with pytest.raises(CALConfigError, match=words):
        CALConfig(**kwargs)


def test_numbers_are_stored_as_python_floats_and_ints():
    import numpy as np

    cfg = CALConfig(alpha=1, beta=np.float32(4.0), pool_window=np.int64(5))
    assert (type(cfg.alpha), type(cfg.beta), type(cfg.pool_window)) == (float, float, int)
    assert cfg == CALConfig(alpha=1.0, beta=4.0, pool_window=5)


def test_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "cal.yaml"
    path.write_text("cal:\n  alpha: [1.0\n  beta: 5.0\n")
    with pytest.raises(CALConfigError) as error:
        resolve_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}, line 3, column 7: invalid YAML")
    assert "starts at line 2, column 10" in message and "<unicode string>" not in message


def test_yaml_python_tag_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"alpha: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(CALConfigError) as error:
        resolve_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}, line 1, column 8: the tag !!python/object/apply:os.system is not allowed")
    assert "yaml.safe_load" in message and "<unicode string>" not in message
    assert not marker.exists()


def test_a_config_path_that_is_a_folder_says_so(tmp_path):
    (tmp_path / "calplug.yaml").write_text("alpha: 1.0\n")
    with pytest.raises(CALConfigError, match=r"is a folder, not a file \(it holds calplug.yaml\): give the path of a YAML file"):
        resolve_config(tmp_path)


def test_a_missing_file_named_by_the_environment_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("CALPLUG_CONFIG", str(tmp_path / "nope.yaml"))
    with pytest.raises(CALConfigError, match=r"nope.yaml' \(named by \$CALPLUG_CONFIG\) does not exist: fix or unset"):
        resolve_config()


def test_yaml_with_sections_reads_the_cal_section_and_names_mistakes(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("training:\n  learning_rate: 2.0e-5\n  epochs: 1\ncal:\n  alpha: 2.0\n  beta: 4.0\n")
    cfg = resolve_config(path)                 # documented: only the cal: section is read
    assert (cfg.alpha, cfg.beta) == (2.0, 4.0)
    path.write_text("training:\n  learning_rate: 2.0e-5\n")
    with pytest.raises(CALConfigError, match=r"'training' is a section, not a calplug setting.*`cal:`"):
        resolve_config(path)
    path.write_text("beta: 3.0\ncal:\n  alpha: 2.0\n")
    with pytest.raises(CALConfigError, match=r"'beta' is at the top level, but the file has a `cal:` section.*move it under `cal:`"):
        resolve_config(path)
    path.write_text("cal:\n  alpha: 2.0\ncalplug:\n  beta: 3.0\n")
    with pytest.raises(CALConfigError, match="both a `cal:` and a `calplug:` section"):
        resolve_config(path)
    path.write_text("cal: 3\n")
    with pytest.raises(CALConfigError, match="the `cal:` section must hold calplug's settings as a mapping"):
        resolve_config(path)


def test_yaml_values_are_checked_with_the_file_named(tmp_path):
    path = tmp_path / "cal.yaml"
    path.write_text("alpha: .nan\n")
    with pytest.raises(CALConfigError, match=rf"^{path}: alpha must be a finite number, got nan"):
        resolve_config(path)
    path.write_text("alpha: 1e-3\n")                 # YAML 1.1 reads this as text
    with pytest.raises(CALConfigError, match=r"alpha must be a number, got '1e-3'.*1\.0e-3"):
        resolve_config(path)
    path.write_text("- alpha\n- beta\n")
    with pytest.raises(CALConfigError, match="expected a mapping of settings"):
        resolve_config(path)
    path.write_bytes(b"alpha: 1.0 \xff\n")
    with pytest.raises(CALConfigError, match="is not UTF-8 text"):
        resolve_config(path)


def test_a_section_passed_as_a_dict_is_named():
    with pytest.raises(CALConfigError, match=r"unknown calplug setting 'cal'.*holds a mapping, like a section"):
        resolve_config({"cal": {"alpha": 1.0}})


# -- the model argument ----------------------------------------------------------------------------
@pytest.mark.parametrize("function", [calplug.enable, calplug.disable, calplug.is_enabled, calplug.config_of])
def test_none_instead_of_a_model(function):
    with pytest.raises(UnsupportedModelError, match=r"calplug got None instead of a model: pass the model object itself"):
        function(None)


def test_a_hub_name_instead_of_a_model():
    with pytest.raises(UnsupportedModelError, match=r"got the name 'llava-hf/llava-1.5-7b-hf' instead of a model: "
                       r"calplug does not load models.*from_pretrained\('llava-hf/llava-1.5-7b-hf'\)"):
        calplug.enable("llava-hf/llava-1.5-7b-hf")


def test_a_class_or_a_trainer_instead_of_a_model(model):
    from transformers import LlavaForConditionalGeneration

    with pytest.raises(UnsupportedModelError, match=r"got the class LlavaForConditionalGeneration, not a model instance"):
        calplug.enable(LlavaForConditionalGeneration)

    class MyTrainer:
        def __init__(self, model):
            self.model = model

    with pytest.raises(UnsupportedModelError, match=r"got a MyTrainer, not a model: pass the model it holds, "
                       r"calplug.enable\(mytrainer.model\).*enable_for_trainer"):
        calplug.enable(MyTrainer(model))
    with pytest.raises(UnsupportedModelError, match="needs a torch.nn.Module"):
        calplug.enable(42)


def test_a_compiled_model_is_refused_naming_the_module_to_enable(model):
    compiled = torch.compile(model)
    with pytest.raises(UnsupportedModelError, match=r"torch.compile'd model.*calplug.enable\(compiled._orig_mod\) "
                       r"and train that module, not the compiled one"):
        calplug.enable(compiled)
    assert not calplug.is_enabled(model)


def test_data_parallel_on_one_device_is_looked_through_and_over_several_refused():
    inner = tiny_llava(1).train()
    dp = nn.DataParallel(inner)            # CPU: no device ids, one replica
    calplug.enable(dp)
    assert calplug.is_enabled(inner) and calplug.config_of(dp) == calplug.config_of(inner)
    calplug.disable(dp)
    assert not calplug.is_enabled(inner)
    dp.device_ids = [0, 1]                 # what DataParallel over two GPUs holds
    with pytest.raises(UnsupportedModelError, match=r"nn.DataParallel over 2 GPUs.*DistributedDataParallel"
                       r".*calplug.enable\(dp.module\) and call dp.module\(...\)"):
        calplug.enable(dp)
    assert not calplug.is_enabled(inner)


# -- pickling ----------------------------------------------------------------------------------------
def _cal_loss(model, batch) -> torch.Tensor:
    torch.manual_seed(0)
    return model(**batch).loss.detach()


@pytest.mark.parametrize("how", ["torch.save", "pickle", "deepcopy"])
def test_an_enabled_model_round_trips_and_comes_back_enabled(how):
    # Saved before its first forward: on transformers 5, a model that has run a forward holds
    # transformers' own output-capturing hooks, local functions pickle cannot save, with or
    # without calplug (docs/errors.md).
    model = tiny_llava(2).train()
    calplug.enable(model, beta=3.0, pool_window=1)
    batch = llava_batch(model)
    if how == "torch.save":
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    elif how == "pickle":
        loaded = pickle.loads(pickle.dumps(model))
    else:
        loaded = copy.deepcopy(model)
    assert calplug.is_enabled(loaded) and calplug.config_of(loaded) == calplug.config_of(model)
    assert loaded.forward.model is loaded               # the copy's forward runs the copy
    assert torch.equal(_cal_loss(loaded, batch), _cal_loss(model, batch))
    assert calplug.is_enabled(copy.deepcopy(loaded))    # after a forward, deepcopy still works
    calplug.disable(loaded)                             # the copy disables alone
    assert "forward" not in loaded.__dict__ and calplug.is_enabled(model)
    loaded.eval()
    with torch.no_grad():
        model.eval()
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    model.train()


def test_a_saved_enabled_model_loads_enabled_in_a_fresh_process(tmp_path):
    model = tiny_llava(3).train()
    calplug.enable(model, alpha=0.5, beta=2.0)
    batch = llava_batch(model)
    torch.save({"model": model, "batch": batch}, tmp_path / "model.pt")   # before a forward (above)
    expected = float(_cal_loss(model, batch))
    # transformers 5 looks a class's output recorders up in a per-process registry filled when a
    # model of that class is built: the fresh process builds one before the loaded model runs.
    script = (
        "import torch, calplug\n"
        f"saved = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
        "m = saved['model']\n"
        "assert calplug.is_enabled(m)\n"
        "from calplug.testing import tiny_llava; tiny_llava(0)\n"
        "torch.manual_seed(0)\n"
        "print(calplug.is_enabled(m), calplug.config_of(m).beta, float(m(**saved['batch']).loss))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    enabled, beta, loss = out.stdout.split()
    assert enabled == "True" and float(beta) == 2.0
    assert float(loss) == pytest.approx(expected, rel=1e-6)


class _LocalModel(nn.Module):
    def forward(self, input_ids=None, labels=None):
        return input_ids


def test_a_plugin_integration_that_cannot_pickle_gets_a_clear_error():
    from calplug import hookspecs, plugins

    def main_pass(model, original, call):  # a local function: pickle cannot save it
        raise AssertionError("not called")

    class Plugin:
        @calplug.hookimpl
        def calplug_integrations(self):
            return [hookspecs.Integration("local-plugin", ("_LocalModel",), main_pass)]

    plugins.register(Plugin(), name="local-plugin-test")
    try:
        model = calplug.enable(_LocalModel())
        with pytest.raises(CALError, match=r"calplug state cannot be pickled: its integration 'local-plugin' "
                           r"\(from a plugin\).*calplug.disable\(model\) before saving.*state_dict"):
            pickle.dumps(model)
        assert calplug.is_enabled(copy.deepcopy(model))   # deepcopy needs no pickling
        calplug.disable(model)
        pickle.dumps(model)
    finally:
        plugins.unregister(name="local-plugin-test")


# -- batches ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("labels, words", [
    (lambda l: l.float(), r"torch.long.*got floating-point torch.float32: convert them with labels.long\(\)"),
    (lambda l: l.int(), r"torch.long.*got non-int64 torch.int32: convert them with labels.long\(\)"),
    (lambda l: l[0], r"labels must be \[batch, seq_len\], got shape \(\d+,\): add the batch dimension: labels\[None\]"),
    (lambda l: l.tolist(), r"labels must be a torch tensor of token ids"),
    (lambda l: l[:, :1], r"sequence length 1.*needs at least 2 tokens"),
    (lambda l: l[:0], r"batch size 0"),
])
def test_malformed_labels_are_refused_before_the_forward(model, labels, words):
    batch = llava_batch(model)
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with calplug.enabled(model), pytest.raises(CALInputError, match=words):
            model(**dict(batch, labels=labels(batch["labels"])))
    finally:
        handle.remove()
    assert calls == [1]    # only the outer call: no main pass ran


def test_label_ids_outside_the_vocabulary_are_named(model):
    batch = llava_batch(model)
    labels = batch["labels"].clone()
    labels[0, -1] = 300
    with calplug.enabled(model), pytest.raises(
            CALInputError, match=r"labels hold token id 300, but the model's vocabulary has 256 entries \(ids 0 to 255\)"
                                 r".*resize_token_embeddings"):
        model(**dict(batch, labels=labels))
    labels[0, -1] = -1
    with calplug.enabled(model), pytest.raises(CALInputError, match=r"labels hold -1, a negative id other than -100"):
        model(**dict(batch, labels=labels))


PLACEHOLDER_LABELS = (
    "labels supervise {n} positions that the image fills (image placeholder or video tokens): the "
    "collator did not set the labels of the image tokens to -100, so training would teach the model "
    "to predict placeholder tokens, and CAL would weight those rows by a gap that compares the "
    "placeholder's logit with and without the image. Set labels to -100 wherever input_ids holds "
    "the image (or video) token id, e.g. labels[input_ids == image_token_id] = -100 (docs/errors.md)")


@pytest.mark.parametrize("contrast", ["drop", "mask"])
def test_labels_on_image_placeholders_are_refused_naming_the_fix(model, contrast, stats):
    """The common collator bug (labels = input_ids, image tokens included): refused at the step,
    before any loss; the same batch with the placeholders masked trains."""
    batch = llava_batch(model)
    ids = batch["input_ids"]
    image = ids == model.config.image_token_index
    labels = batch["labels"].clone()
    labels[image] = ids[image]
    # rows predicting a placeholder: every image position but a sample's first (its label is
    # shifted away only at position 0; here the image starts at position 1)
    n = int((image[:, 1:] & (labels[:, 1:] != -100)).sum())
    assert n == 2 * model.config.image_seq_length
    with calplug.enabled(model, contrast=contrast), pytest.raises(CALInputError) as refused:
        model(**dict(batch, labels=labels))
    assert str(refused.value) == PLACEHOLDER_LABELS.format(n=n)
    assert stats.steps == 0                            # refused before the loss, nothing observed
    with calplug.enabled(model, contrast=contrast):
        assert torch.isfinite(model(**batch).loss)     # masked as llava_batch does: trains


def test_a_label_on_one_placeholder_is_enough_to_refuse(model):
    batch = llava_batch(model)
    labels = batch["labels"].clone()
    first = int((batch["input_ids"][1] == model.config.image_token_index).nonzero()[3])
    labels[1, first] = model.config.image_token_index
    with calplug.enabled(model), pytest.raises(CALInputError, match=re.escape(
            PLACEHOLDER_LABELS.format(n=1))):
        model(**dict(batch, labels=labels))


def test_a_batch_without_supervised_tokens_gives_zero_loss_and_warns_once(model, fresh_warnings, stats):
    batch = llava_batch(model)
    ignored = dict(batch, labels=torch.full_like(batch["labels"], -100))
    model.zero_grad()
    with calplug.enabled(model):
        with pytest.warns(CALWarning, match=r"no supervised token.*loss 0 and no gradient.*model's own loss would be NaN"
                          r".*cal/ignored_batches; shown once"):
            out = model(**ignored)
        out.loss.backward()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(**ignored)                             # the second time: no warning
        model(**batch)
    assert out.loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert torch.isnan(model(**ignored).loss)            # the model's own loss, documented
    scalars = stats.scalars()
    assert scalars["cal/ignored_batches"] == 2 and scalars["cal/nonfinite_gaps"] == 0
    stats.reset()
    with calplug.enabled(model):
        model(**ignored)
    # a log interval of ignored batches only still reports them (the callback logs these keys)
    assert stats.scalars() == {"cal/ignored_batches": 1.0, "cal/nonfinite_gaps": 0.0}
    model.zero_grad()


def test_a_warning_turned_into_an_error_raises_every_time(model, fresh_warnings):
    batch = llava_batch(model)
    ignored = dict(batch, labels=torch.full_like(batch["labels"], -100))
    with calplug.enabled(model), warnings.catch_warnings():
        warnings.simplefilter("error", CALWarning)
        for _ in range(2):
            with pytest.raises(CALWarning):
                model(**ignored)


def test_a_nan_pixel_warns_and_never_makes_nan_weights(model, fresh_warnings, stats):
    batch = llava_batch(model)
    pixels = batch["pixel_values"].clone()
    pixels[0, 0, 3, 3] = float("nan")
    bad = dict(batch, pixel_values=pixels)
    with calplug.enabled(model, alpha=0.5, beta=3.0):
        with pytest.warns(CALWarning, match=r"non-finite gap.*in the model's own forward \(the main pass\).*"
                          r"weighted as rows without a contrast value.*torch.isfinite\(pixel_values\)"):
            out = model(**bad)
    own = model(**bad).loss
    assert torch.isnan(out.loss) and torch.isnan(own)   # the loss is as finite as the model's own
    sup = batch["labels"][:, 1:] != -100
    w = out.cal_weights[sup]
    assert torch.isfinite(w).all() and (w >= 0.5).all() and (w <= 3.0).all()
    nonfinite = int((~torch.isfinite(out.cal_gaps) & sup).sum())
    assert nonfinite > 0 and torch.isfinite(out.cal_gaps[2]).all()   # the text-only sample is clean
    assert stats.scalars()["cal/nonfinite_gaps"] == nonfinite


def test_non_finite_contrast_gaps_are_weighted_as_gap_zero(model, fresh_warnings, monkeypatch):
    """Main pass finite, contrast pass not: the loss stays finite and equals the one whose weights
    treat those rows as rows without a contrast value."""
    batch = llava_batch(model)
    real = contrast_pass.target_gaps
    poisoned = {}

    def target_gaps(*args, **kwargs):
        gaps, has, lse = real(*args, **kwargs)
        gaps = gaps.clone()
        gaps[0, -3:] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        poisoned["gaps"] = gaps
        return gaps, has, lse

    monkeypatch.setattr(contrast_pass, "target_gaps", target_gaps)
    with calplug.enabled(model, alpha=1.0, beta=4.0, pool_window=1):
        with pytest.warns(CALWarning, match=r"3 supervised rows.*all in the contrast pass.*the loss stays finite"):
            out = model(**batch)
    assert torch.isfinite(out.loss)
    gaps = poisoned["gaps"]
    expected_w = torch.where(torch.isfinite(gaps), gaps, torch.zeros_like(gaps)).clamp(1.0, 4.0)
    assert torch.equal(out.cal_weights, expected_w)
    assert torch.isnan(out.cal_gaps[0, -3])                     # cal_gaps show what was computed


# -- the fork-patch engine -------------------------------------------------------------------------
HEADER = "Name: test-patch\nUpstream: https://github.com/example/fork\nCommit: 0123456789abcdef\n\n"


def _diff(path: str, old: str, new: str) -> str:
    return (f"diff --git a/{path} b/{path}\n--- a/{path}\n+++ b/{path}\n@@ -1,3 +1,3 @@\n"
            f" first line\n-{old}\n+{new}\n last line\n")


def _tree(root: Path, names=("a.txt", "pkg/b.txt", "pkg/c.txt")) -> Path:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"first line\nold {name}\nlast line\n")
    return root


def _patch(tmp_path: Path, *diffs: str) -> Path:
    path = tmp_path / "test.patch"
    path.write_text(HEADER + "".join(diffs))
    return path


def _state(root: Path) -> dict:
    """Every file and link under root: bytes, mode, inode and modification time (a file written
    and put back differs in inode or time even when its bytes are the same)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (p.read_bytes() if p.is_file() and not p.is_symlink() else None,
                                         st.st_mode, st.st_ino, st.st_mtime_ns)
    return out


def _run(capsys, *argv) -> tuple[int, str]:
    from calplug import cli

    rc = cli.main(["patch", *argv])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("target, reason", [
    ("../victim/target.txt", r"climbs out of the folder with a '\.\.' component"),
    ("pkg/../../victim/target.txt", r"climbs out of the folder with a '\.\.' component"),
    ("ABSOLUTE", r"is an absolute path"),
    ("link/target.txt", r"goes through the symbolic link .*link' \(-> .*victim'\).*does not write through symbolic links"),
])
def test_a_patch_cannot_write_outside_its_tree(tmp_path, capsys, engine, target, reason):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "target.txt").write_text("first line\nold victim\nlast line\n")
    root = _tree(tmp_path / "fork")
    (root / "link").symlink_to(victim)
    if target == "ABSOLUTE":
        target = str(victim / "target.txt")
    patch = _patch(tmp_path, _diff("a.txt", "old a.txt", "new a.txt"), _diff(target, "old victim", "pwned"))
    before_tree, before_victim = _state(root), _state(victim)
    rc, err = _run(capsys, "apply", str(patch), str(root))
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "refusing test-patch: it names the file" in err and "Nothing was changed" in err
    assert re.search(reason, err), err
    assert _state(root) == before_tree and _state(victim) == before_victim
    with pytest.raises(patching.PatchError, match=reason):
        patching.check(patching.read_patch(patch), root)
    with pytest.raises(patching.PatchError, match=reason):   # the engine itself refuses too
        patching._apply_python(patching.read_patch(patch), root, reverse=False)
    assert _state(root) == before_tree and _state(victim) == before_victim


def test_a_symlinked_file_inside_the_tree_is_refused_as_git_does(tmp_path, capsys, engine):
    root = _tree(tmp_path / "fork")
    (root / "alias.txt").symlink_to(root / "a.txt")
    patch = _patch(tmp_path, _diff("alias.txt", "old a.txt", "new"))
    before = _state(root)
    rc, err = _run(capsys, "apply", str(patch), str(root))
    assert rc == 2 and "symbolic link" in err and _state(root) == before


def test_a_write_failing_midway_leaves_the_tree_as_it_was(tmp_path, capsys, monkeypatch):
    """Python engine, three files: the second write fails. The first is put back, the third is
    never touched (same inode and time), and the error is one line."""
    monkeypatch.setattr(patching, "_git", lambda: None)
    root = _tree(tmp_path / "fork")
    (root / "pkg/b.txt").chmod(0o640)
    patch = _patch(tmp_path, *(_diff(n, f"old {n}", f"new {n}") for n in ("a.txt", "pkg/b.txt", "pkg/c.txt")))
    before = _state(root)
    real, calls = patching._replace, []

    def failing_replace(path, data, mode=None):
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(path))
        return real(path, data, mode)

    monkeypatch.setattr(patching, "_replace", failing_replace)
    rc, err = _run(capsys, "apply", str(patch), str(root))
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err and "During handling" not in err
    assert "could not write pkg/b.txt" in err and "No space left on device" in err and "Nothing was changed" in err
    assert calls == ["a.txt", "b.txt", "a.txt"]          # a.txt written, b.txt failed, a.txt put back
    after = _state(root)
    for name in before:
        assert after[name][:2] == before[name][:2], name  # bytes and mode
    assert after["pkg/c.txt"] == before["pkg/c.txt"]       # never touched: same inode and time
    assert after["pkg/b.txt"] == before["pkg/b.txt"]       # the failed write left nothing behind
    assert sorted(p.name for p in root.rglob("*calplug-patch-tmp*")) == []


def test_git_apply_failing_midway_is_undone_touching_only_what_it_changed(tmp_path, capsys, monkeypatch):
    if patching._git() is None:
        missing("git", "git is not installed: this test runs `git apply` (apt-get install git)")
    root = _tree(tmp_path / "fork")
    patch = _patch(tmp_path, *(_diff(n, f"old {n}", f"new {n}") for n in ("a.txt", "pkg/b.txt", "pkg/c.txt")))
    before = _state(root)
    real_git = patching._run_git

    def half_applying_git(where, args):
        if "--check" in args:
            return real_git(where, args)
        (where / "a.txt").write_text("first line\nnew a.txt\nlast line\n")
        return subprocess.CompletedProcess(args, 1, "", "error: pkg/b.txt: Permission denied")

    monkeypatch.setattr(patching, "_run_git", half_applying_git)
    rc, err = _run(capsys, "apply", str(patch), str(root))
    assert rc == 2 and err.count("\n") == 1 and "git apply failed after a clean check" in err
    after = _state(root)
    assert after["a.txt"][:2] == before["a.txt"][:2]
    assert {k: v for k, v in after.items() if k != "a.txt"} == {k: v for k, v in before.items() if k != "a.txt"}


def test_a_read_only_tree_gets_one_line_and_no_file_is_rewritten(tmp_path, capsys, engine, monkeypatch):
    root = _tree(tmp_path / "fork")
    patch = _patch(tmp_path, _diff("a.txt", "old a.txt", "new a.txt"), _diff("pkg/b.txt", "old pkg/b.txt", "new"))
    if os.geteuid() == 0:
        # root writes through permission bits: report the files as read-only instead
        monkeypatch.setattr(patching, "_writable", lambda path: False)
    else:
        for p in [*root.rglob("*"), root]:
            p.chmod(p.stat().st_mode & ~0o222)
    before = _state(root)
    try:
        rc, err = _run(capsys, "apply", str(patch), str(root))
    finally:
        for p in [root, *root.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "cannot edit a.txt, pkg/b.txt" in err and "read-only" in err and "chmod u+w" in err
    assert "Nothing was changed" in err
    after = _state(root)
    assert {k: v[:1] + v[2:] for k, v in after.items()} == {k: v[:1] + v[2:] for k, v in before.items()}


def test_the_patch_applies_and_reverses_after_the_checks(tmp_path, capsys, engine):
    root = _tree(tmp_path / "fork")
    patch = _patch(tmp_path, _diff("a.txt", "old a.txt", "new a.txt"), _diff("pkg/b.txt", "old pkg/b.txt", "new b"))
    before = _state(root)
    assert _run(capsys, "apply", str(patch), str(root))[0] == 0
    assert (root / "a.txt").read_text() == "first line\nnew a.txt\nlast line\n"
    assert _state(root)["pkg/c.txt"] == before["pkg/c.txt"]   # a file the patch does not name
    assert _run(capsys, "apply", "--reverse", str(patch), str(root))[0] == 0
    assert {k: v[:2] for k, v in _state(root).items()} == {k: v[:2] for k, v in before.items()}


# -- the commands ----------------------------------------------------------------------------------
def test_inspect_on_a_folder_that_is_not_a_model(tmp_path, capsys):
    from calplug import cli

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.png").write_bytes(b"")
    assert cli.main(["inspect", "--model", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is not a model folder" in err and "config.json" in err and "calplug demo" in err
    assert "--caption" not in err and err.count("\n") == 1


def test_inspect_out_that_is_a_file_fails_before_loading_the_model(tmp_path, capsys, monkeypatch):
    from calplug import cli
    from calplug.cli import inspect

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    target = tmp_path / "report"
    target.write_text("not a folder")
    monkeypatch.setattr(inspect, "processor_samples", lambda *a: pytest.fail("loaded the model"))
    assert cli.main(["inspect", "--model", str(folder), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("calplug inspect: error: --out") and "is a file, not a folder" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("args, words", [
    (["--batch", "0"], r"--batch must be an integer >= 1 \(samples per micro-batch\), got 0: e.g. --batch 2"),
    (["--layers", "0"], r"--layers must be an integer >= 1"),
    (["--text-tokens", "-5"], r"--text-tokens must be an integer >= 2"),
    (["--vocab", "3"], r"--vocab must be an integer >= 8"),
    (["--warmup", "-1"], r"--warmup must be an integer >= 0"),
    (["--threads", "0"], r"--threads must be >= 1"),
    (["--hidden", "60", "--heads", "4"], r"even quotient"),
    (["--device", "gpu"], r"--device 'gpu' is not a device torch knows"),
])
def test_bench_options_out_of_range(args, words):
    from calplug import cli

    with pytest.raises(CALConfigError, match=words):
        cli.main(["bench", "--device", "cpu", *args, "--no-memory", "--debug"])


def test_bench_json_path_is_checked_before_timing(tmp_path, capsys, monkeypatch):
    from calplug import cli
    from calplug.cli import bench

    monkeypatch.setattr(bench, "benchmark", lambda cfg: pytest.fail("timed"))
    assert cli.main(["bench", "--device", "cpu", "--json", str(tmp_path)]) == 2
    assert "is a folder: give a file path" in capsys.readouterr().err
    assert cli.main(["bench", "--device", "cpu", "--json", str(tmp_path / "no" / "b.json")]) == 2
    assert "does not exist; create it first" in capsys.readouterr().err
