"""`calplug verify` / `calplug.verify(model, batch)`: passes on every family calplug's tests build,
fails on deliberately broken integrations and contrasts (each check can fail, and says which),
leaves the model as it found it, and the command's exit status follows the table (0 pass, 1 fail,
2 usage)."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import calplug
from calplug import CALInputError, cli, plugins
from calplug.contrast import select_positions
from calplug.hookspecs import Contrast, Integration
from calplug.integrations import compat, families, transformers_vlm
import _hf_families as hf
from _skips import importorskip, skip_unrunnable_family
from test_family_calls import skip_known_upstream_bug

BLIND_DROP = "contrast pass blind to the image (drop)"
BLIND_MASK = "contrast pass blind to the image (mask)"
SEES = "main pass sees the image"
DROP_MASK = "drop = mask on text rows (gaps)"
FAITHFUL = "faithful = two-forward reference"
DROP_REF = "drop = two-forward reference"
VARY = "reference weights vary (alpha 0, beta 5)"
UNIT = "unit weights = the model's own loss"
DISABLE = "disable restores the forward (bit-identical)"
POSITIONS = "image positions cover where the pixels enter"
HEAD = "model logits = lm_head(hidden) + declared transform"



def family_runs():
    runs = []
    for name, family in hf.FAMILIES.items():
        runs.append(pytest.param(name, ("image", "image", None), "right", id=f"{name}-image"))
        if family.video:
            runs.append(pytest.param(name, family.video_kinds, "right", id=f"{name}-video"))
    runs += [pytest.param(n, ("image", "image", None), "left", id=f"{n}-image-left")
             for n in ("llava", "qwen2_vl", "qwen3_5")]
    return runs


def built(name, kinds=("image", "image", None), padding_side="right", **build):
    family = hf.FAMILIES[name]
    skip_unrunnable_family(family)
    skip_known_upstream_bug(name, kinds)
    model = family.build(0, **build).train()
    return model, hf.make_batch(family, model, kinds=kinds, padding_side=padding_side)


def failed(report) -> set[str]:
    return {c.name for c in report.failed}


@pytest.mark.parametrize("name, kinds, padding_side", family_runs())
def test_verify_passes_on_every_family(name, kinds, padding_side):
    model, batch = built(name, kinds, padding_side)
    gradients = kinds[0] == "image" and padding_side == "right"  # once per family is enough
    report = calplug.verify(model, batch, gradients=gradients)
    names = {c.name for c in report.checks} | ({f"{FAITHFUL}: gradients", f"{DROP_REF}: gradients"}
                                                if not gradients else set())
    if hf.FAMILIES[name].drop_only:  # mask refused: drop against the removal reference
        assert {BLIND_DROP, SEES, UNIT, DISABLE, f"{DROP_REF}: loss", f"{DROP_REF}: gradients"} <= names
        assert BLIND_MASK not in names and "contrast='mask' is refused" in report.table()
    else:
        assert {BLIND_DROP, BLIND_MASK, SEES, DROP_MASK, UNIT, DISABLE, f"{FAITHFUL}: loss",
                f"{FAITHFUL}: gaps", f"{FAITHFUL}: weights", f"{FAITHFUL}: gradients", VARY} <= names
    # every check passes: a tiny builder whose image does not matter (the Molmo2 adapter's init,
    # fixed in tests/_hf_families.py) fails here, so its family cannot be listed as proven
    assert failed(report) == set(), report.table()
    assert report.support[0] == "proven"


# -- deliberately broken: each check fails where it should -----------------------------------------
class LeakyDrop:
    """A plugin whose "drop" contrast keeps the image positions: the contrast pass sees the image."""

    @calplug.hookimpl
    def calplug_contrasts(self):
        def build(main, config):
            with_image = main.visual_mask.any(1)
            if not bool(with_image.any()):
                return None
            return select_positions(main, main.attention_mask.bool(), with_image.nonzero().squeeze(1))
        return [Contrast("drop", build)]


@dataclasses.dataclass
class BrokenIntegration:
    """A plugin integration for one class, wrapping the real main pass and breaking its result
    with ``breaks(model, main)``."""

    class_name: str
    breaks: object

    @calplug.hookimpl
    def calplug_integrations(self):
        real = transformers_vlm.MainPassOf()

        def main_pass(model, original_forward, call):
            main = real(model, original_forward, call)
            self.breaks(model, main)
            return main
        return [Integration("broken", (self.class_name,), main_pass, compat.vlm_decoder_and_head)]


@pytest.fixture
def plugin():
    registered = []

    def register(obj):
        registered.append(plugins.register(obj))
    yield register
    for name in registered:
        plugins.unregister(name=name)


def test_verify_fails_on_a_contrast_that_leaks_the_image(plugin):
    model, batch = built("llava")
    plugin(LeakyDrop())
    report = calplug.verify(model, batch)
    assert failed(report) == {BLIND_DROP, DROP_MASK}, report.table()
    leak = next(c for c in report.checks if c.name == BLIND_DROP)
    assert leak.measured > 1e-3 and "the image leaks into the contrast pass" in report.table()


def test_verify_fails_on_an_integration_that_misses_image_positions(plugin):
    """The last image position of each sample is not reported: the pixels reach a position the
    integration does not report, and both contrasts let text rows see it. (The reference hides
    the integration's positions, the one place calplug reads them, so faithful mode still equals
    it: what catches a missed position is that the contrast side is not blind.)"""
    def miss_last(model, main):
        last = main.visual_mask.long().cumsum(1) == main.visual_mask.sum(1, keepdim=True)
        main.visual_mask = main.visual_mask & ~(last & main.visual_mask)

    model, batch = built("qwen2_vl")
    plugin(BrokenIntegration("Qwen2VLForConditionalGeneration", miss_last))
    report = calplug.verify(model, batch)
    assert {POSITIONS, BLIND_DROP, BLIND_MASK} <= failed(report), report.table()
    assert "2.00e+00" in report.table().split(POSITIONS)[1].splitlines()[0]  # one per image sample
    assert not {SEES, UNIT, DISABLE} & failed(report)
    assert "integration broken" in report.setting


def test_verify_fails_when_the_router_loss_is_dropped(plugin):
    """An integration that loses the MoE load-balancing term: the unit-weight loss is no longer
    the model's own, and the faithful loss misses it too (gaps and weights are still right)."""
    def drop_router_loss(model, main):
        main.extra_loss = None

    model, batch = built("qwen3_vl_moe", router_aux_loss_coef=0.5)
    batch = dict(batch, output_router_logits=True)
    assert calplug.verify(model, batch).passed
    plugin(BrokenIntegration("Qwen3VLMoeForConditionalGeneration", drop_router_loss))
    report = calplug.verify(model, batch)
    assert failed(report) == {UNIT, f"{FAITHFUL}: loss", f"{FAITHFUL}: gradients"}, report.table()


def test_verify_fails_when_the_step_changes_the_model(plugin):
    """An integration whose main pass changes a weight in place: disable cannot restore it."""
    def scale_head(model, main):
        main.lm_head.weight.data.mul_(1.01)  # .data: the graph of this step stays intact

    model, batch = built("llava")
    plugin(BrokenIntegration("LlavaForConditionalGeneration", scale_head))
    assert DISABLE in failed(calplug.verify(model, batch))


def test_verify_fails_when_the_image_does_not_reach_the_model():
    """Zero image features: the blindness checks then prove nothing, and verify says so."""
    model, batch = built("llava")
    projector = next(m for n, m in model.named_modules() if n.endswith("multi_modal_projector"))
    with torch.no_grad():
        projector.linear_2.weight.zero_()
        projector.linear_2.bias.zero_()
    report = calplug.verify(model, batch)
    assert SEES in failed(report)
    assert next(c for c in report.checks if c.name == SEES).measured == 0


# -- the model is left as found; bad batches ---------------------------------------------------------
def test_verify_leaves_the_model_as_it_found_it():
    model, batch = built("llava")
    calplug.enable(model, beta=3.0, contrast="mask")
    model.eval()
    head = model.get_output_embeddings().weight
    head.grad = torch.full_like(head, 0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert calplug.verify(model, batch, gradients=True).passed
    assert calplug.is_enabled(model) and calplug.config_of(model).beta == 3.0
    assert calplug.config_of(model).contrast == "mask" and not model.training
    assert torch.equal(head.grad, torch.full_like(head, 0.5))
    assert all(p.grad is None for n, p in model.named_parameters() if p is not head)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_verify_without_gradients_skips_only_that_check():
    model, batch = built("llava")
    report = calplug.verify(model, batch, gradients=False)
    assert report.passed and f"{FAITHFUL}: gradients" not in {c.name for c in report.checks}
    assert all(p.grad is None for p in model.parameters())


def test_verify_turns_stochastic_depth_off_for_its_checks():
    """Qianfan-OCR's vision tower with stochastic depth (its default drop_path_rate is 0.1; 0.5
    here, so that most training forwards drop differently: with it left on, the checks compare
    such forwards and fail): every check passes (verify runs the network with DropPath's
    drop_prob at 0, as with dropout) and the rates are restored after."""
    skip_unrunnable_family(hf.FAMILIES["qianfan_ocr"])
    from _hf_shrunk_more import build_qianfan_ocr

    model = build_qianfan_ocr(0, drop_path_rate=0.5).train()
    batch = hf.make_batch(hf.FAMILIES["qianfan_ocr"], model)
    rates = {n: m.drop_prob for n, m in model.named_modules() if hasattr(m, "drop_prob")}
    assert rates and max(rates.values()) == pytest.approx(0.5)
    torch.manual_seed(0)
    assert not torch.equal(model(**batch).logits, model(**batch).logits)
    report = calplug.verify(model, batch)
    assert failed(report) == set(), report.table()
    assert {n: m.drop_prob for n, m in model.named_modules() if hasattr(m, "drop_prob")} == rates


def test_verify_refuses_batches_it_cannot_check():
    model, batch = built("llava")
    with pytest.raises(CALInputError, match="at least one image"):
        calplug.verify(model, hf.make_batch(hf.FAMILIES["llava"], model, kinds=(None, None)))
    with pytest.raises(CALInputError, match="input_ids and labels"):
        calplug.verify(model, {k: v for k, v in batch.items() if k != "labels"})
    with pytest.raises(CALInputError, match="every label of the batch is -100"):
        calplug.verify(model, dict(batch, labels=torch.full_like(batch["labels"], -100)))


# -- the enable warning for matched classes names this command ----------------------------------------
def test_the_matched_class_warning_names_verify_and_what_it_checks():
    """A class the generic integration accepts without a family proof (Unlimited-OCR: no row, no
    family case) warns at enable; the command it names exists, each check it promises is a row of
    the report (the reference rows are drop's: its decoder refuses mask), and the report passes
    on a tiny one, the self-check row included."""
    import transformers
    from _hf_shrunk import MATCHED_CLASS, MATCHED_VISUAL, build_matched

    if not hasattr(transformers, MATCHED_CLASS):
        pytest.skip(f"{MATCHED_CLASS} needs transformers >= 5.0 (installed "
                    f"{transformers.__version__}); run `tox -e py`")
    assert families.support_status(MATCHED_CLASS)[0] == "matched"
    model = build_matched(0).train()
    family = dataclasses.replace(hf.FAMILIES["vipllava"], visual=MATCHED_VISUAL, images=False)
    batch = hf.make_batch(family, model)

    calplug.errors._WARNED.discard(f"matched:{MATCHED_CLASS}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calplug.enable(model)
    calplug.disable(model)
    message = next(str(w.message) for w in caught if MATCHED_CLASS in str(w.message))
    assert "`calplug verify`" in message and "calplug.verify(model, batch)" in message
    assert "verify" in cli.COMMANDS
    report = calplug.verify(model, batch)
    assert "contrast='mask' is refused" in report.table()
    promised = {"the contrast pass is blind to the image": BLIND_DROP,
                "faithful mode equals the two-forward reference": f"{DROP_REF}: loss",
                "unit weights give the model's own loss": UNIT}
    rows = {c.name for c in report.checks}
    for phrase, row in promised.items():
        assert phrase in message and row in rows
    assert report.passed, report.table()
    assert HEAD in rows
    assert report.support[0] == "matched" and "support matrix: matched" in report.table()


# -- the command ---------------------------------------------------------------------------------------
def test_command_on_a_tiny_family_passes(capsys):
    assert cli.main(["verify", "--tiny", "llava"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("calplug verify: LlavaForConditionalGeneration")
    for name in (BLIND_DROP, BLIND_MASK, SEES, f"{FAITHFUL}: gradients", UNIT, DISABLE, HEAD):
        assert any(line.startswith(name) and "  pass  " in line for line in out.splitlines()), name
    assert out.rstrip().endswith("13 checks: all passed")


def test_command_exits_1_on_a_failing_check(plugin, capsys):
    plugin(LeakyDrop())
    assert cli.main(["verify", "--tiny", "llava"]) == 1
    out = capsys.readouterr().out
    assert any(line.startswith(BLIND_DROP) and "  FAIL  " in line for line in out.splitlines())
    assert f"FAIL {BLIND_DROP}: replacing the pixels changed" in out
    assert out.rstrip().endswith("13 checks: 2 FAILED")


def test_command_usage_errors_exit_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["verify"])
    assert exit_.value.code == 2 and "one of the arguments --model --tiny is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["verify", "--tiny", "no-such-family"])
    assert exit_.value.code == 2 and "invalid choice: 'no-such-family'" in capsys.readouterr().err
    assert cli.main(["verify", "--tiny", "llava", "--image", "a.png"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("calplug verify: error: --image / --caption go with --model") and err.count("\n") == 1
    assert cli.main(["verify", "--model", str(tmp_path / "nope"), "--image", "a.png", "--caption", "x"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["verify", "--model", str(tmp_path / "empty"), "--image", "a.png", "--caption", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("cannot load the model and its processor" in err or "pillow" in err)


def _saved_llava_with_processor(folder):
    """A tiny Llava saved with a LlavaProcessor over a word-level tokenizer built offline."""
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    from calplug.testing import tiny_llava

    words = ["<pad>", "<bos>", "<eos>"] + "describe : a small large red blue green circle square on the left right".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<pad>")
    fast.add_tokens(["<image>"], special_tokens=True)
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                  crop_size={"height": 32, "width": 32}),
                               tokenizer=fast, patch_size=8, vision_feature_select_strategy="default",
                               image_token="<image>", num_additional_image_tokens=1)
    tiny_llava(0, vocab_size=len(fast), image_token=fast.convert_tokens_to_ids("<image>")).save_pretrained(folder)
    processor.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(2):
        pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        paths.append(folder / f"{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def test_command_on_a_saved_model_with_its_processor(tmp_path, capsys):
    importorskip("tokenizers", "tokenizers", "the `tokenizers` package (a transformers dependency) "
                 "builds the test tokenizer: pip install tokenizers")
    importorskip("PIL", "pillow", "the image processor reads images with pillow: pip install pillow")
    model_dir = tmp_path / "model"
    a, b = _saved_llava_with_processor(model_dir)
    args = ["verify", "--model", str(model_dir), "--prompt", "<bos> <image> describe : ",
            "--image", str(a), "--caption", "a small red circle on the left <eos>",
            "--image", str(b), "--caption", "a large blue square <eos>"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "batch of 2 samples, 2 with images or videos" in out and out.rstrip().endswith("all passed")
    with pytest.raises(calplug.CALConfigError, match="as many --caption as --image"):
        cli.main(args[:-2] + ["--debug"])


# -- the replaced pixels; the self-check's states ----------------------------------------------------
def test_replaced_flattened_patches_keep_their_index_columns():
    """Kosmos-2.5's flattened patches lead each row with its row and column index: verify's other
    pixels keep those (and the all-zero padding patches), and replace every pixel value."""
    from calplug.verifying import _replace_pixels

    g = torch.Generator().manual_seed(0)
    index = torch.stack([torch.arange(1, 5).repeat_interleave(4), torch.arange(1, 5).repeat(4)], -1).float()
    patches = torch.cat([index.expand(2, 16, 2), torch.randn(2, 16, 48, generator=g)], -1)
    patches[1, 12:] = 0  # padding patches
    other = _replace_pixels(patches, torch.Generator().manual_seed(1))
    assert torch.equal(other[..., :2], patches[..., :2]) and torch.equal(other[1, 12:], patches[1, 12:])
    real = patches[..., 2:] != 0
    assert bool((other[..., 2:] != patches[..., 2:])[real].all())
    assert abs(float(other[..., 2:][real].std()) - float(patches[..., 2:].std())) < 0.2
    # images: every value is a pixel (a constant whole-number column, a black border, too)
    image = torch.randn(1, 3, 8, 8, generator=g)
    image[..., 0] = -1.0
    assert bool((_replace_pixels(image, torch.Generator().manual_seed(1)) != image).all())


def test_self_check_catches_states_changed_between_decoder_and_head(monkeypatch):
    """Inkling divides the decoder's output by its muP width multiplier before lm_head; its row
    declares the division. Without it the contrast side's target logits (from the decoder's
    output) would be 1 / 0.5 of the model's: verify's self-check row fails, quoting both logits."""
    family = hf.FAMILIES["inkling"]
    skip_unrunnable_family(family)
    facts = families.FAMILIES[family.class_name]
    assert facts.logit_transform[0].attribute == "logits_mup_width_multiplier"
    model, batch = built("inkling")
    assert model.config.text_config.logits_mup_width_multiplier == 0.5
    assert calplug.verify(model, batch, gradients=False).passed
    monkeypatch.setitem(families.FAMILIES, family.class_name,
                        dataclasses.replace(facts, logit_transform=facts.logit_transform[1:]))
    report = calplug.verify(model, batch, gradients=False)
    head = next(c for c in report.checks if c.name == HEAD)
    assert not head.passed and head.measured > 0.1, report.table()
    assert "the forward transforms its logits after lm_head" in report.table()
