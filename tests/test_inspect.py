"""`calplug inspect`: gaps and weights come from a CAL training forward and match a hand
computation; each caption token carries its gap, clamped weight and pooled weight, printed before
any file is written; pooling lends a token its neighbours' weight; the HTML renders its tokens in
a real headless browser; the histogram and JSON are written."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import calplug
from calplug import cli
from calplug.cli import synthetic
from calplug.cli import inspect as inspection
import _demo_checkpoint
from _skips import importorskip, missing

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A demo checkpoint: the demo's tiny model, a few training steps on synthetic captions."""
    return _demo_checkpoint.build(tmp_path_factory)


def hand_gaps(model, batch: dict) -> torch.Tensor:
    """The default (drop) contrast by hand: target logit of the full multimodal sequence minus that
    of the text tokens alone at their original position ids; [B, L-1], 0 off the kept rows."""
    model.eval()
    ids, labels = batch["input_ids"], batch["labels"]
    image = model.config.image_token_index
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"]).logits.float()
        out = torch.zeros(ids.shape[0], ids.shape[1] - 1)
        for b in range(ids.shape[0]):
            keep = torch.nonzero(ids[b] != image).squeeze(1)
            text = model(input_ids=ids[b, keep][None], position_ids=keep[None]).logits[0].float()
            for k, i in enumerate(keep.tolist()):
                if i + 1 < ids.shape[1] and labels[b, i + 1] != -100:
                    y = labels[b, i + 1]
                    out[b, i] = full[b, i, y] - text[k, y]
    return out


def test_gaps_match_hand_computation_and_model_state_is_restored(checkpoint):
    from transformers import LlavaForConditionalGeneration

    vocab = synthetic.Vocab.load(checkpoint / "calplug_vocab.json")
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    data = synthetic.make_set(3, seed=5, noise=0.0)
    batch = synthetic.batch(data, [0, 1, 2], vocab)
    found = inspection.gaps_and_weights(model, batch)
    expected = hand_gaps(model, batch)
    sup = found["supervised"]
    assert sup.sum() == 3 * 14  # every caption word, <eos> included
    assert found["gaps"][sup].abs().max() > 1e-3  # the image matters to a trained model
    torch.testing.assert_close(found["gaps"][sup], expected[sup], atol=2e-4, rtol=1e-4)
    w = found["weights"][sup]
    assert w.min() >= 1.0 - 1e-6 and w.max() <= 5.0 + 1e-6
    torch.testing.assert_close(found["clamped"], found["gaps"].clamp(1.0, 5.0))
    # the pooled weight of a caption word inside the caption is the mean of its row and the two
    # neighbouring rows' clamped weights (window 3, flat scope)
    b, j = 0, synthetic.PROMPT_LENGTH + 1
    torch.testing.assert_close(found["weights"][b, j], found["clamped"][b, j - 1:j + 2].mean())
    # The model leaves as it came: not enabled, still in eval mode.
    assert not calplug.is_enabled(model) and not model.training


def test_previous_cal_config_survives(checkpoint):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint)
    calplug.enable(model, beta=3.0)
    vocab = synthetic.Vocab()
    batch = synthetic.batch(synthetic.make_set(2, seed=1), [0, 1], vocab)
    inspection.gaps_and_weights(model, batch, calplug.CALConfig(beta=7.0))
    assert calplug.is_enabled(model) and calplug.config_of(model).beta == 3.0


def test_each_token_carries_the_numbers_of_the_row_that_predicts_it():
    samples = [dict(tokens=["<bos>", "<image>", "<image>", "a", "red", "<eos>"], note="",
                    kinds=[None, None, None, "template", "contradicted visual", "template"])]
    delta = torch.tensor([0.0, 0.0, 0.5, -3.0, 6.0])      # row i predicts token i + 1
    clamped = delta.clamp(1.0, 5.0)
    weights = torch.tensor([1.0, 1.0, 1.0, 2.33, 3.0])
    supervised = torch.tensor([False, False, True, True, True])
    rows = inspection.token_rows(samples, [dict(gaps=delta, clamped=clamped, weights=weights, supervised=supervised)])
    toks = rows[0]["tokens"]
    assert [t["supervised"] for t in toks] == [False, False, False, True, True, True]
    assert [(t["text"], t["gap"], t["clamped"], t["weight"]) for t in toks if t["supervised"]] == [
        ("a", 0.5, 1.0, 1.0), ("red", -3.0, 1.0, pytest.approx(2.33)), ("<eos>", 6.0, 5.0, 3.0)]
    assert toks[4]["kind"] == "contradicted visual"
    text = inspection.format_tokens(rows, calplug.CALConfig())
    lines = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.startswith("  ")
             and line.split()[0] in ("token", "gap", "clamped", "pooled")}
    assert lines == dict(token=["a", "red", "<eos>"], gap=["+0.5", "-3.0", "+6.0"],
                         clamped=["1.00", "1.00", "5.00"], pooled=["1.00", "2.33", "3.00"])
    assert "visual words that contradict the image" in text and "-3.00 -> 1.00 -> 2.33  (1 tokens)" in text
    collapsed = inspection.collapse_runs(toks)
    assert [t["text"] for t in collapsed] == ["<bos>", "<image>", "a", "red", "<eos>"]
    assert collapsed[1]["repeat"] == 2


def test_inspect_command_prints_gap_clamped_and_pooled_then_writes_files(checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "inspect"
    printed_first = []
    real_save = inspection.save_report
    monkeypatch.setattr(inspection, "save_report", lambda *a, **k: (
        printed_first.append("pooled" in capsys.readouterr().out), real_save(*a, **k))[1])
    assert cli.main(["inspect", "--model", str(checkpoint), "--out", str(out), "--samples", "4",
                     "--noise", "0.5"]) == 0
    assert printed_first == [True]  # the token table was on stdout before any file was written
    data = json.loads((out / "tokens.json").read_text())
    assert len(data["samples"]) == 4
    assert sum(s["corrupted"] for s in data["samples"]) == 2
    sup = [t for s in data["samples"] for t in s["tokens"] if t["supervised"]]
    assert len(sup) == 4 * 14
    alpha, beta = data["config"]["alpha"], data["config"]["beta"]
    for t in sup:
        assert t["clamped"] == pytest.approx(min(max(t["gap"], alpha), beta))
        assert alpha - 1e-6 <= t["weight"] <= beta + 1e-6
    kinds = {t["kind"] for t in sup}
    assert kinds == {"true visual", "contradicted visual", "filler", "template"}
    html = (out / "tokens.html").read_text()
    assert html.count("class='tok'") == 3 * 56  # gap, clamped and pooled lines per caption
    assert "data-clamped=" in html
    from PIL import Image

    with Image.open(out / "gaps.png") as im:
        assert im.size[0] > 300 and im.size[1] > 200


def test_inspect_refuses_a_missing_model_folder(tmp_path):
    with pytest.raises(calplug.CALConfigError, match="is not a folder"):
        cli.main(["inspect", "--model", str(tmp_path / "nope"), "--debug"])


def test_html_renders_tokens_in_a_headless_browser(checkpoint, tmp_path):
    if not Path(CHROMIUM).exists():
        missing("chromium", f"{CHROMIUM} is missing: install it with "
                "`apt-get update && apt-get install -y chromium` to run the browser test")
    out = tmp_path / "inspect"
    assert cli.main(["inspect", "--model", str(checkpoint), "--out", str(out), "--samples", "3"]) == 0
    data = json.loads((out / "tokens.json").read_text())
    words = [t["text"] for s in data["samples"] for t in s["tokens"] if t["supervised"]]
    profile = tmp_path / "profile"
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}"]
    url = (out / "tokens.html").resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    # The page's own script counted the coloured tokens the browser laid out with a visible box.
    rendered = re.search(r'data-rendered-tokens="(\d+)"', dom)
    assert rendered, f"the browser did not run the page (DOM starts: {dom[:300]!r})"
    assert int(rendered.group(1)) == 3 * len(words)
    shown = re.findall(r'<span class="tok"[^>]*>([^<]*)</span>', dom)
    assert shown == [w.replace("<", "&lt;").replace(">", "&gt;") for s in data["samples"]
                     for line in range(3) for w in [t["text"] for t in s["tokens"] if t["supervised"]]]
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1000,800", url],
                   capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(shot) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 50  # text, images and coloured chips, not a blank page
    shutil.rmtree(profile, ignore_errors=True)


def _saved_model_with_processor(folder: Path):
    """A tiny Llava saved with a LlavaProcessor over a word-level tokenizer built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    from calplug.testing import tiny_llava

    vocab = synthetic.Vocab()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab.words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<pad>")
    fast.add_tokens(["<image>"], special_tokens=True)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=8,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1)
    tiny_llava(0, vocab_size=len(vocab)).save_pretrained(folder)
    processor.save_pretrained(folder)
    data = synthetic.make_set(2, seed=0)
    paths = []
    for i, im in enumerate(data.images):
        paths.append(folder / f"{i}.png")
        im.save(paths[-1])
    return paths


def test_inspect_a_saved_model_with_its_processor(tmp_path, capsys):
    importorskip("tokenizers", "tokenizers", "the `tokenizers` package (a transformers dependency) "
                 "builds the test tokenizer: pip install tokenizers")
    model_dir = tmp_path / "model"
    a, b = _saved_model_with_processor(model_dir)
    caps = ["a small red circle on the left <eos>", "a large blue square <eos>"]
    out = tmp_path / "out"
    assert cli.main(["inspect", "--model", str(model_dir), "--out", str(out), "--prompt", "<bos> <image> describe : ",
                     "--image", str(a), "--caption", caps[0], "--image", str(b), "--caption", caps[1]]) == 0
    data = json.loads((out / "tokens.json").read_text())
    for sample, cap in zip(data["samples"], caps):
        assert [t["text"] for t in sample["tokens"] if t["supervised"]] == cap.split()
        # the prompt, image placeholders included, is context
        assert [t["text"] for t in sample["tokens"] if not t["supervised"]][:2] == ["<bos>", "<image>"]
    assert "13 supervised tokens in 2 samples" in capsys.readouterr().out
    with pytest.raises(calplug.CALConfigError, match="as many --caption as --image"):
        cli.main(["inspect", "--model", str(model_dir), "--image", str(a), "--debug"])
