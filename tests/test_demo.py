"""`calplug demo`: the synthetic data say what they claim, the metric and the verdict count right,
CAL is on in the CAL runs only, and a shortened demo runs end to end with well-formed output."""
from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import pytest
import torch

import calplug
from calplug import cli, plugins
from calplug.cli import demo, synthetic
from calplug.errors import CALConfigError


# -- data -----------------------------------------------------------------------------------------
def test_noise_corrupts_exactly_that_share_and_every_visual_word():
    n = 50
    clean = synthetic.make_set(n, seed=3, noise=0.0)
    noisy = synthetic.make_set(n, seed=3, noise=0.4)
    assert int(noisy.corrupted.sum()) == 20 and not clean.corrupted.any()
    assert torch.equal(clean.pixel_values, noisy.pixel_values)  # same images at every rate
    slots = {"size": 1, "colour": 2, "shape": 3, "position": 6}
    for i in range(n):
        scene = clean.scenes[i]
        for attr, slot in slots.items():
            assert clean.captions[i][slot] == getattr(scene, attr)
            if noisy.corrupted[i]:
                assert noisy.captions[i][slot] != getattr(scene, attr)
                assert noisy.captions[i][slot] in synthetic.ATTRIBUTES[attr]
            else:
                assert noisy.captions[i] == clean.captions[i]
        # the words no image can predict are the same in both
        assert noisy.captions[i][10] == clean.captions[i][10] in synthetic.FILLERS
    # A higher rate corrupts a superset of the captions a lower one does.
    noisier = synthetic.make_set(n, seed=3, noise=0.6)
    assert bool((noisier.corrupted | ~noisy.corrupted).all())


def test_images_show_the_colour_size_and_position_the_scene_says():
    data = synthetic.make_set(40, seed=1)
    for scene, image in zip(data.scenes, data.images):
        px = torch.from_numpy(np.asarray(image, dtype=np.float32))  # [32, 32, 3]
        target = torch.tensor(synthetic.RGB[scene.colour], dtype=torch.float32)
        on = (px - target).abs().sum(-1) < 1
        cols = torch.nonzero(on)[:, 1].float()
        third = {"left": 0, "middle": 1, "right": 2}[scene.position]
        assert int(cols.mean() // (32 / 3)) == third
        rows = torch.nonzero(on)[:, 0]
        height = int(rows.max() - rows.min()) + 1  # 2 r + 1; r in 3..5 (small) or 6..8 (large)
        assert (height <= 11) if scene.size == "small" else (height >= 13)


def test_vocab_round_trip_and_image_token_is_last(tmp_path):
    v = synthetic.Vocab()
    assert v.image == len(v) - 1
    words = ["a", "red", "circle", "<eos>"]
    assert v.decode(v.encode(words)) == words
    v.save(tmp_path / "v.json")
    assert synthetic.Vocab.load(tmp_path / "v.json").words == v.words


# -- metric and verdict ---------------------------------------------------------------------------
def test_score_counts_the_first_word_of_each_attribute():
    v = synthetic.Vocab()
    data = synthetic.make_set(2, seed=0)
    s0, s1 = data.scenes
    wrong_colour = next(c for c in synthetic.ATTRIBUTES["colour"] if c != s0.colour)
    rows = [
        # sample 0: size, shape, position right; first colour word wrong (a later right one ignored)
        ["a", s0.size, wrong_colour, s0.colour, s0.shape, "on", "the", s0.position],
        # sample 1: only the shape is said, and right
        ["a", s1.shape, ".", ".", ".", ".", ".", "."],
    ]
    generated = torch.tensor([v.encode(r) for r in rows])
    acc = demo.score(generated, data, v)
    assert acc["colour"] == 0.0 and acc["size"] == 0.5 and acc["shape"] == 1.0 and acc["position"] == 0.5
    assert acc["all"] == pytest.approx(4 / 8)


def test_verdict_needs_a_difference_beyond_the_margin():
    assert demo.verdict([0.5, 0.52], [0.7, 0.71], eval_words=2000)[0] == "CAL helps"
    assert demo.verdict([0.7, 0.71], [0.5, 0.52], eval_words=2000)[0] == "CAL hurts"
    assert demo.verdict([0.60, 0.70], [0.65, 0.75], eval_words=2000)[0] == "CAL helps"  # paired, consistent
    assert demo.verdict([0.60, 0.70], [0.70, 0.60], eval_words=2000)[0] == "no clear difference"
    # one seed: only evaluation sampling; 2 * sqrt(2 * .5 * .5 / 100) = 0.141
    v, d, margin = demo.verdict([0.5], [0.6], eval_words=100)
    assert v == "no clear difference" and margin == pytest.approx(0.1414, abs=1e-3)


# -- training -------------------------------------------------------------------------------------
class _Counter:
    def __init__(self):
        self.calls = 0

    @calplug.hookimpl
    def calplug_observe_step(self, gaps):
        self.calls += 1


@pytest.mark.parametrize("cal", [False, True])
def test_cal_is_on_in_cal_runs_only(cal):
    v = synthetic.Vocab()
    proto = demo.Protocol(steps=3, train_size=32)
    model = demo.build_model(0, v, proto)
    counter = _Counter()
    plugins.register(counter, name="test-demo-counter")
    try:
        losses = demo.train(model, synthetic.make_set(32, seed=0), v, proto, 0, cal=cal)
    finally:
        plugins.unregister(name="test-demo-counter")
    assert counter.calls == (3 if cal else 0)
    assert len(losses) == 3 and all(l > 0 for l in losses)
    assert not calplug.is_enabled(model) and not model.training


def test_bad_protocol_options_are_refused():
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    with pytest.raises(CALConfigError, match="noise rates must lie in"):
        demo.protocol_from_args(parser.parse_args(["--noise", "0,1.5"]))
    with pytest.raises(CALConfigError, match="comma-separated"):
        demo.protocol_from_args(parser.parse_args(["--noise", "low"]))
    with pytest.raises(CALConfigError, match="--steps"):
        demo.protocol_from_args(parser.parse_args(["--steps", "0"]))
    full = demo.protocol_from_args(parser.parse_args(["--full", "--seed", "7"]))
    assert full.seeds == (7, 8, 9, 10, 11) and full.steps > demo.Protocol().steps


def test_shortened_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rates = ["0", "0.3", "0.6"]
    assert cli.main(["demo", "--out", str(out), "--steps", "6", "--noise", ",".join(rates), "--seeds", "2",
                     "--train-size", "32", "--eval-size", "8", "--no-progress"]) == 0
    text = capsys.readouterr().out
    r = json.loads((out / "results.json").read_text())
    assert set(r["accuracy"]) == {"plain", "cal"}
    for method in ("plain", "cal"):
        assert set(r["accuracy"][method]) == {str(float(p)) for p in rates}
        for p, accs in r["accuracy"][method].items():
            assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs)
            for a, per in zip(accs, r["per_attribute"][method][p]):
                # overall accuracy is the mean over the four attributes, each a count over 8 images
                assert a == pytest.approx(statistics.fmean(per[k] for k in synthetic.ATTRIBUTES))
                assert all(abs(per[k] * 8 - round(per[k] * 8)) < 1e-9 for k in synthetic.ATTRIBUTES)
    assert [row["noise"] for row in r["summary"]] == [float(p) for p in rates]
    for row in r["summary"]:
        p = str(row["noise"])
        assert row["plain"] == pytest.approx(statistics.fmean(r["accuracy"]["plain"][p]))
        assert row["cal"] == pytest.approx(statistics.fmean(r["accuracy"]["cal"][p]))
        assert row["difference"] == pytest.approx(row["cal"] - row["plain"])
        assert row["verdict"] in ("CAL helps", "CAL hurts", "no clear difference")
        assert f"{row['noise']:>6.0%}  {row['plain']:>6.3f}  {row['cal']:>6.3f}" in text
        assert row["verdict"] in text
    assert r["protocol"]["seeds"] == [0, 1] and r["protocol"]["steps"] == 6
    from PIL import Image

    with Image.open(out / "accuracy_vs_noise.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
    for p in ("0", "0.3", "0.6"):  # the first seed's CAL model at every noise rate
        ckpt = out / f"cal-model-noise-{p}"
        assert (ckpt / "config.json").is_file() and (ckpt / "calplug_vocab.json").is_file()
