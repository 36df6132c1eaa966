"""The commands around contrastive decoding: ``calplug generate`` (plain and contrastive answers
side by side), ``calplug bench --decode`` (time per new token, as a ratio) and ``calplug demo
--decoding`` (the paired effect on the demo's visual-word accuracy)."""
from __future__ import annotations

import json

import pytest
import torch

import calplug
from calplug import cli
from calplug.cli import demo_decoding, demo_metrics, demo_protocol, synthetic
from calplug.cli.generate import side_by_side
import _demo_checkpoint
from _skips import importorskip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A `calplug demo` checkpoint: the demo's tiny model after a few plain steps."""
    return _demo_checkpoint.build(tmp_path_factory)


def test_generate_on_a_saved_model_prints_both_answers_side_by_side(tmp_path, capsys):
    importorskip("tokenizers", "tokenizers", "it is a transformers dependency (pip install tokenizers); it builds the test tokenizer")
    importorskip("PIL", "pillow", "the image processor reads images with pillow: pip install pillow (tox -e py has it)")
    from test_verify import _saved_llava_with_processor
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = tmp_path / "model"
    a, b = _saved_llava_with_processor(folder)
    prompt = "<bos> <image> describe : "
    assert cli.main(["generate", "--model", str(folder), "--image", str(a), "--image", str(b),
                     "--prompt", prompt, "--max-new-tokens", "5", "--cd-alpha", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("calplug generate: model (LlavaForConditionalGeneration)")
    assert "cd_alpha=3" in out[0] and out[1].split() == ["image", "plain", "contrastive"]
    # the plain column is generate()'s greedy answer, the other contrastive_generate's
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    from PIL import Image

    inputs = dict(processor(images=[Image.open(a).convert("RGB"), Image.open(b).convert("RGB")],
                            text=[prompt] * 2, return_tensors="pt", padding=True))
    inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "pixel_values")}
    width = inputs["input_ids"].shape[1]
    plain = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)[:, width:]
    ours = calplug.contrastive_generate(model, cd_alpha=3.0, max_new_tokens=5, pad_token_id=0, **inputs)[:, width:]
    decode = lambda ids: processor.tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    expected = side_by_side([a.name, b.name], [decode(r) for r in plain], [decode(r) for r in ours], ["", ""])
    assert "\n".join(out[1:]) == expected
    assert not torch.equal(plain, ours)  # alpha = 3 changes the answers of this model


def test_generate_on_a_demo_checkpoint_names_what_each_image_shows(checkpoint, capsys):
    assert cli.main(["generate", "--model", str(checkpoint), "--samples", "2", "--max-new-tokens", "14"]) == 0
    out = capsys.readouterr().out
    assert "sample 0" in out and "sample 1" in out and out.count("(image shows: ") == 2
    assert "contrast=drop, cd_alpha=1, cd_beta=0.1" in out


def test_generate_usage_errors_exit_2(checkpoint, tmp_path, capsys):
    assert cli.main(["generate", "--model", str(checkpoint), "--cd-beta", "2"]) == 2
    assert "cd_beta must be a finite number in [0, 1]" in capsys.readouterr().err
    assert cli.main(["generate", "--model", str(tmp_path)]) == 2
    assert "at least one --image" in capsys.readouterr().err
    assert cli.main(["generate", "--model", str(tmp_path / "nope"), "--image", "a.png"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert cli.main(["generate", "--model", str(checkpoint), "--max-new-tokens", "0"]) == 2


def test_bench_decode_reports_the_ratio_per_new_token(tmp_path, capsys):
    out = tmp_path / "decode.json"
    tiny = ["--image-tokens", "16", "--text-before-image", "5", "--vocab", "2000", "--hidden", "64",
            "--intermediate", "128", "--heads", "4", "--kv-heads", "2", "--layers", "2",
            "--vision-hidden", "32", "--repeats", "2", "--warmup", "0", "--device", "cpu",
            "--threads", "1", "--new-tokens", "4"]
    assert cli.main(["bench", "--decode", *tiny, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "contrastive / plain per new token:" in text
    assert "both branches in one decoder call per token" in text
    r = json.loads(out.read_text())
    assert r["alpha_zero_equals_generate"] is True and r["joined_equals_two_pass"] is True
    assert r["joined"] is True and r["unjoined"] is None  # the bench's Llava has a DynamicCache
    for clock in ("wall", "cpu"):
        times = {k: sorted(v) for k, v in r[clock].items()}
        variants = ("plain", "contrastive", "two_pass")
        assert set(times) == {f"{v}-{n}" for v in variants for n in (1, 4)}
        median = {k: (v[0] + v[1]) / 2 for k, v in times.items()}
        per = {v: (median[f"{v}-4"] - median[f"{v}-1"]) / 3 for v in variants}
        assert r[f"per_token_{clock}"]["plain"]["per_token"] == pytest.approx(per["plain"])
        assert r[f"ratio_{clock}"] == pytest.approx(per["contrastive"] / per["plain"])
        assert r["ratio_two_pass"][clock] == pytest.approx(per["two_pass"] / per["plain"])
    assert r["prompt"]["text_tokens"] == [29, 21] and r["prompt"]["positions"] == 45
    assert cli.main(["bench", "--decode", *tiny[:-1], "1"]) == 2  # --new-tokens 1: no per-token time


def test_demo_decoding_greedy_column_is_the_demos_own_greedy(checkpoint):
    """generate()'s greedy answers score as the demo's own greedy loop does, and the paired rows
    are the per-seed differences."""
    from transformers import LlavaForConditionalGeneration

    vocab = synthetic.Vocab.load(checkpoint / "calplug_vocab.json")
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint)
    proto = demo_protocol.Protocol()
    evalset = synthetic.make_set(48, seed=9)
    found = demo_decoding.evaluate(model, evalset, vocab, proto)
    own = demo_metrics.score(demo_metrics.greedy(model, evalset.pixel_values, vocab, proto.greedy_tokens),
                             evalset, vocab)
    assert found["greedy"] == pytest.approx(own)
    assert found["image_differences"]["n"] == 48
    diff = found["contrastive"]["all"] - found["greedy"]["all"]
    assert found["image_differences"]["mean"] == pytest.approx(diff)
    runs = {"0": dict(plain=dict(decoding=found), cal=dict(decoding=found))}
    result = dict(protocol=dict(seeds=[0], eval_size=48, conditions=[dict(key="0.4", label="40%")]),
                  stage2={"0.4": runs})
    rows = demo_decoding.paired_rows(result)
    assert [r["method"] for r in rows] == ["plain", "cal"]
    assert rows[0]["difference"] == pytest.approx(diff) and rows[0]["per_seed"] == [pytest.approx(diff)]
    assert "contr.-greedy" in demo_decoding.table(result, rows)
