"""`calplug demo`: the synthetic data say what they claim; the primary metric equals a hand
computation; the verdict counts right; stage 2 of plain and CAL starts from identical weights and
sees identical batches of fresh images; the stage-1 cache is read back; a shortened demo runs end
to end and prints its table before writing files."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics

import numpy as np
import pytest
import torch

import calplug
from calplug import cli, plugins
from calplug.cli import demo, demo_metrics, demo_protocol, demo_report, demo_training, demo_verdicts, synthetic
from calplug.errors import CALConfigError


# -- data -----------------------------------------------------------------------------------------
def test_noise_corrupts_exactly_that_share_and_every_visual_word():
    n = 50
    clean = synthetic.make_set(n, seed=3, noise=0.0)
    noisy = synthetic.make_set(n, seed=3, noise=0.4)
    assert int(noisy.corrupted.sum()) == 20 and not clean.corrupted.any()
    assert torch.equal(clean.pixel_values, noisy.pixel_values)  # same images at every rate
    slots = synthetic.VISUAL_SLOTS
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


def test_systematic_noise_maps_each_value_to_one_fixed_other():
    data = synthetic.make_set(60, seed=2, noise=0.5, corruption="systematic")
    seen = {}
    for scene, cap, bad in zip(data.scenes, data.captions, data.corrupted):
        for attr, slot in synthetic.VISUAL_SLOTS.items():
            truth, said = getattr(scene, attr), cap[slot]
            if not bad:
                assert said == truth
                continue
            assert said != truth and seen.setdefault((attr, truth), said) == said
    assert len(seen) > 8
    for (attr, truth), said in seen.items():  # the next value of the attribute's list
        values = synthetic.ATTRIBUTES[attr]
        assert said == values[(values.index(truth) + 1) % len(values)]
    assert synthetic.corrupt_systematically(dict(size="small", colour="red", shape="circle", position="left")) == dict(
        size="large", colour="green", shape="square", position="middle")
    with pytest.raises(ValueError, match="corruption"):
        synthetic.make_set(4, seed=0, noise=0.5, corruption="sometimes")


def test_caption_layout_constants_match_the_captions():
    words = synthetic.caption_words(dict(size="large", colour="red", shape="circle", position="left"),
                                    ("lucky", "quiet"))
    assert len(words) == synthetic.CAPTION_LENGTH
    assert {a: words[s] for a, s in synthetic.VISUAL_SLOTS.items()} == dict(
        size="large", colour="red", shape="circle", position="left")
    assert [words[s] for s in synthetic.FILLER_SLOTS] == ["lucky", "quiet"]
    assert synthetic.PROMPT_LENGTH == len(synthetic.prompt_ids(synthetic.Vocab()))


# -- metrics --------------------------------------------------------------------------------------
def _trained(steps=6, seed=0):
    v = synthetic.Vocab()
    model = demo_training.build_model(seed, v, demo_protocol.Protocol())
    data = synthetic.make_set(64, seed=seed)
    demo_training.train(model, data, demo_training.schedule(64, steps, 32, seed), v, lr=3e-3, warmup=1,
                        grad_clip=1.0, cal=False)
    return model, v


def test_primary_metric_equals_a_hand_computation():
    model, v = _trained()
    data = synthetic.make_set(3, seed=9)
    found = demo_metrics.true_word_logprobs(model, data, v, chunk=2)  # two chunks
    assert found.shape == (3, 4)
    for i in range(3):
        caption = data.captions[i]
        ids = torch.tensor([synthetic.prompt_ids(v) + v.encode(caption)])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           pixel_values=data.pixel_values[i:i + 1]).logits[0].double()
        for k, (attr, slot) in enumerate(synthetic.VISUAL_SLOTS.items()):
            pos = synthetic.PROMPT_LENGTH + slot          # where the word sits in the sequence
            row = logits[pos - 1]                          # the logits that predict it
            assert caption[slot] == getattr(data.scenes[i], attr)
            expected = float(row[v.ids[caption[slot]]] - math.log(sum(math.exp(x) for x in row.tolist())))
            assert float(found[i, k]) == pytest.approx(expected, abs=1e-5)
    summary = demo_metrics.per_attribute(found)
    assert summary["colour"] == pytest.approx(float(found[:, 1].mean()))
    assert summary["all"] == pytest.approx(float(found.mean()))
    with pytest.raises(ValueError, match="clean captions"):
        demo_metrics.true_word_logprobs(model, synthetic.make_set(4, seed=1, noise=0.5), v)


def test_greedy_from_the_cache_equals_decoding_from_scratch():
    model, v = _trained(steps=10)
    px = synthetic.make_set(5, seed=4).pixel_values
    found = demo_metrics.greedy(model, px, v, max_new=6, chunk=3)
    ids = torch.tensor([synthetic.prompt_ids(v)] * 5)
    with torch.no_grad():
        for _ in range(6):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(found, ids[:, -6:])


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
    acc = demo_metrics.score(generated, data, v)
    assert acc["colour"] == 0.0 and acc["size"] == 0.5 and acc["shape"] == 1.0 and acc["position"] == 0.5
    assert acc["all"] == pytest.approx(4 / 8)


def test_weight_statistics_sort_words_by_kind():
    L = synthetic.PROMPT_LENGTH + synthetic.CAPTION_LENGTH
    gaps = torch.zeros(2, L - 1)
    weights = torch.ones(2, L - 1)
    row = lambda slot: synthetic.PROMPT_LENGTH + slot - 1
    gaps[0, row(2)], weights[0, row(2)] = 6.0, 4.0     # sample 0 clean: colour word
    gaps[1, row(2)], weights[1, row(2)] = -3.0, 2.0    # sample 1 corrupted: colour word
    gaps[:, row(10)] = 0.5                              # a filler word
    stats = demo_metrics.new_weight_stats()
    demo_metrics.add_weight_stats(stats, gaps, weights, torch.tensor([False, True]))
    s = demo_metrics.weight_summary(stats)
    assert s["groups"]["true"]["n"] == 4 and s["groups"]["wrong"]["n"] == 4 and s["groups"]["filler"]["n"] == 4
    assert s["groups"]["true"]["gap"] == pytest.approx(6.0 / 4)
    assert s["groups"]["true"]["clamped"] == pytest.approx((5.0 + 3) / 4)   # clamped to beta = 5
    assert s["groups"]["wrong"]["clamped"] == pytest.approx(1.0)           # clamped to alpha = 1
    assert s["groups"]["wrong"]["pooled"] == pytest.approx((2.0 + 3) / 4)
    assert s["groups"]["filler"]["gap"] == pytest.approx(0.5 / 2)
    assert s["attributes"]["colour"]["pooled"] == pytest.approx(4.0)
    total = 2 * synthetic.CAPTION_LENGTH + 3 + 1                          # summed caption weights
    assert s["mean_weight"] == pytest.approx(total / (2 * synthetic.CAPTION_LENGTH))
    assert s["share"]["colour"] == pytest.approx(4.0 / (s["mean_weight"] * synthetic.CAPTION_LENGTH))


# -- verdict --------------------------------------------------------------------------------------
def test_t_quantiles():
    assert demo_verdicts.t975(2) == pytest.approx(4.303)
    assert demo_verdicts.t975(7) == pytest.approx(2.365)
    assert demo_verdicts.t975(40) == pytest.approx(2.021, abs=1e-3)
    assert demo_verdicts.t975(120) == pytest.approx(1.980, abs=1e-3)


def test_pooled_sd_is_the_sd_of_the_union():
    a, b = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.0, 5.0])
    groups = [dict(n=3, mean=float(a.mean()), sd=float(a.std())), dict(n=2, mean=float(b.mean()), sd=float(b.std()))]
    assert demo_verdicts.pooled_sd(groups) == pytest.approx(float(torch.cat([a, b]).std()))


def test_verdict_needs_a_difference_beyond_the_margin():
    assert demo_verdicts.verdict([0.20, 0.19, 0.21])["verdict"] == "CAL helps"
    assert demo_verdicts.verdict([-0.20, -0.19, -0.21])["verdict"] == "CAL hurts"
    # consistent sign but large spread: 3 seeds need t = 4.30 standard errors
    v = demo_verdicts.verdict([0.02, 0.10, 0.06])
    assert v["se"] == pytest.approx(0.04 / math.sqrt(3)) and v["margin"] == pytest.approx(4.303 * v["se"])
    assert v["verdict"] == "no clear difference"
    # the evaluation's own sampling error sets a floor on the margin
    tight = demo_verdicts.verdict([0.010, 0.010, 0.011], [dict(n=100, mean=0.01, sd=0.5)] * 3)
    pooled = 0.5 * math.sqrt(3 * 99 / 299)  # three groups of 100 with sd 0.5 and one mean
    assert tight["margin"] == pytest.approx(1.96 * pooled / math.sqrt(300))
    assert tight["verdict"] == "no clear difference"
    one = demo_verdicts.verdict([0.1], [dict(n=100, mean=0.1, sd=0.2)])
    assert one["se"] == 0.0 and one["verdict"] == "CAL helps"


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
    model = demo_training.build_model(0, v, demo_protocol.Protocol())
    counter = _Counter()
    plugins.register(counter, name="test-demo-counter")
    try:
        losses = demo_training.train(model, synthetic.make_set(32, seed=0), demo_training.schedule(32, 3, 32, 0),
                                     v, lr=1e-3, warmup=1, grad_clip=1.0, cal=cal)
    finally:
        plugins.unregister(name="test-demo-counter")
    assert counter.calls == (3 if cal else 0)
    assert len(losses) == 3 and all(l > 0 for l in losses)
    assert not calplug.is_enabled(model) and not model.training


def test_schedule_sees_every_image_once_per_pass():
    batches = demo_training.schedule(64, 5, 32, seed=3)
    first_pass = torch.cat(batches[:2])
    assert sorted(first_pass.tolist()) == list(range(64))
    assert [b.tolist() for b in batches] == [b.tolist() for b in demo_training.schedule(64, 5, 32, seed=3)]


TINY = ["--seeds", "2", "--stage1-steps", "3", "--stage1-images", "32", "--steps", "2",
        "--memorised-images", "32", "--eval-size", "8"]


def _tiny_protocol(**changes) -> demo_protocol.Protocol:
    Condition = demo_protocol.Condition
    fields = dict(seeds=(0,), conditions=(Condition(0.0), Condition(0.5), Condition(0.5, "memorised")),
                  stage1_steps=3, stage1_images=32, stage2_steps=3, memorised_images=32, eval_size=8)
    return demo_protocol.Protocol(**(fields | changes))


def test_stage2_plain_and_cal_start_from_identical_weights_and_see_identical_batches(monkeypatch):
    calls = []
    real_train = demo_training.train

    def recording_train(model, data, batches, vocab, **kw):
        seen = []
        hook = model.register_forward_pre_hook(
            lambda mod, args, kwargs: seen.append({k: kwargs[k].clone() for k in ("input_ids", "labels", "pixel_values")}),
            with_kwargs=True)
        calls.append(dict(cal=kw["cal"], lr=kw["lr"], start={k: v.clone() for k, v in model.state_dict().items()},
                          vision_trained=any(p.requires_grad for p in demo_training.vision_tower(model).parameters()),
                          trained=sum(p.requires_grad for p in model.parameters()),
                          indices=torch.cat(batches).tolist(), n_images=len(data), inputs=seen))
        try:
            return real_train(model, data, batches, vocab, **kw)
        finally:
            hook.remove()
            calls[-1]["end"] = {k: v.clone() for k, v in model.state_dict().items()}

    monkeypatch.setattr(demo_training, "train", recording_train)
    proto = _tiny_protocol()
    demo_training.run_experiment(proto, show_progress=False, cache=None)
    stage1, rest = calls[0], calls[1:]
    assert stage1["lr"] == proto.stage1_lr and not stage1["cal"] and stage1["vision_trained"]
    assert len(rest) == 2 * len(proto.conditions)
    for cond, (plain, cal) in zip(proto.conditions, zip(rest[::2], rest[1::2])):
        assert (plain["cal"], cal["cal"]) == (False, True)
        for run in (plain, cal):  # both start from the trained stage-1 weights
            assert all(torch.equal(run["start"][k], stage1["end"][k]) for k in stage1["end"])
            assert not run["vision_trained"] and run["trained"] > 0  # the vision tower is frozen
        assert plain["indices"] == cal["indices"] and len(plain["inputs"]) == proto.stage2_steps
        for a, b in zip(plain["inputs"], cal["inputs"]):
            assert all(torch.equal(a[k], b[k]) for k in a)
        if cond.kind == "memorised":
            assert plain["n_images"] == proto.memorised_images
        else:  # fresh images, each seen at most once
            assert len(set(plain["indices"])) == len(plain["indices"]) == proto.stage2_steps * proto.batch_size
        # and stage 2 did train: the weights moved
        assert any(not torch.equal(plain["end"][k], plain["start"][k]) for k in plain["start"])


def test_stage1_weights_are_cached_by_protocol(tmp_path, monkeypatch, capsys):
    proto = _tiny_protocol(conditions=(demo_protocol.Condition(0.5),))
    first = demo_training.run_experiment(proto, show_progress=False, cache=tmp_path, keep_models=False)
    folder = demo_training.stage1_folder(tmp_path, proto, threads=1)
    assert (folder / "seed-0.pt").is_file() and json.loads((folder / "protocol.json").read_text())["steps"] == 3
    monkeypatch.setattr(demo_training, "run_stage1", lambda *a, **k: pytest.fail("stage 1 ran despite the cache"))
    second = demo_training.run_experiment(proto, show_progress=False, cache=tmp_path, keep_models=False)
    assert second["stage1"]["0"]["cached"] and not first["stage1"]["0"]["cached"]
    assert second["stage2"] == first["stage2"]  # one thread: the same numbers from the cached weights
    # another stage-1 protocol is another folder; a changed stage-2 protocol is the same one
    assert demo_training.stage1_folder(tmp_path, dataclasses.replace(proto, stage1_steps=4), 1) != folder
    assert demo_training.stage1_folder(tmp_path, dataclasses.replace(proto, stage2_lr=5e-4), 1) == folder
    assert demo_training.stage1_folder(tmp_path, proto, 2) != folder  # threads change the last bits


def test_an_unwritable_cache_warns_and_the_demo_runs_on(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proto = _tiny_protocol(conditions=(demo_protocol.Condition(0.0),))
    result = demo_training.run_experiment(proto, show_progress=False, cache=blocker / "cache", keep_models=False)
    assert result["stage1_cache"] is None and not result["stage1"]["0"]["cached"]
    err = capsys.readouterr().err
    assert "warning: stage-1 cache" in err and "cannot be written" in err


def test_default_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("CALPLUG_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo_training.default_cache_dir() == tmp_path / "xdg" / "calplug"
    monkeypatch.setenv("CALPLUG_CACHE_DIR", str(tmp_path / "mine"))
    assert demo_training.default_cache_dir() == tmp_path / "mine"


def test_bad_protocol_options_are_refused():
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    with pytest.raises(CALConfigError, match="noise rates must lie in"):
        demo.protocol_from_args(parser.parse_args(["--noise", "0,1.5"]))
    with pytest.raises(CALConfigError, match="comma-separated"):
        demo.protocol_from_args(parser.parse_args(["--noise", "low"]))
    with pytest.raises(CALConfigError, match="unknown noise kind"):
        demo.protocol_from_args(parser.parse_args(["--noise", "0.4:sometimes"]))
    with pytest.raises(CALConfigError, match="twice"):
        demo.protocol_from_args(parser.parse_args(["--noise", "0.4,0.4"]))
    with pytest.raises(CALConfigError, match="--steps"):
        demo.protocol_from_args(parser.parse_args(["--steps", "0"]))
    default = demo.protocol_from_args(parser.parse_args([]))
    assert len(default.seeds) >= 3 and [c.key for c in default.conditions] == ["0", "0.4"]
    full = demo.protocol_from_args(parser.parse_args(["--full", "--seed", "7"]))
    assert full.seeds == tuple(range(7, 15)) and len(full.conditions) > len(default.conditions)
    assert {c.kind for c in full.conditions} == {"random", "systematic", "memorised"}


def test_shortened_demo_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CALPLUG_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    printed_before_files = []
    real_plot = demo_report.plot

    def plot_after_table(*a, **k):  # the first file written after results.json
        printed_before_files.append((out / "results.json").is_file())
        return real_plot(*a, **k)

    real_write = demo.Path.write_text

    def write_text(self, *a, **k):
        if self.name == "results.json":
            printed_before_files.append("CAL-plain" in capsys.readouterr().out)
        return real_write(self, *a, **k)

    monkeypatch.setattr(demo.Path, "write_text", write_text)
    monkeypatch.setattr(demo_report, "plot", plot_after_table)
    assert cli.main(["demo", "--out", str(out), *TINY, "--noise", "0,0.5,0.5:systematic", "--no-progress"]) == 0
    assert printed_before_files == [True, True]
    r = json.loads((out / "results.json").read_text())
    keys = ["0", "0.5", "0.5-systematic"]
    assert [c["key"] for c in r["protocol"]["conditions"]] == keys and r["protocol"]["seeds"] == [0, 1]
    assert set(r["stage1"]) == {"0", "1"}
    for key in keys:
        for seed in ("0", "1"):
            found = r["stage2"][key][seed]
            for method in ("plain", "cal"):
                for metric in ("logprob", "accuracy"):
                    per = found[method][metric]
                    assert per["all"] == pytest.approx(statistics.fmean(per[a] for a in synthetic.ATTRIBUTES))
                assert all(per[a] * 8 == pytest.approx(round(per[a] * 8)) for a in synthetic.ATTRIBUTES)
                assert all(found[method]["logprob"][a] < 0 for a in synthetic.ATTRIBUTES)
            assert found["cal"]["cal_weights"]["groups"]["true"]["n"] > 0
            assert (found["cal"]["cal_weights"]["groups"]["wrong"]["n"] > 0) == (key != "0")
        # A 3-step stage 1 grounds nothing: every gap stays below alpha, every weight is alpha,
        # and CAL is plain cross-entropy (the reason the demo has a stage 1 at all).
        for seed in ("0", "1"):
            w = r["stage2"][key][seed]["cal"]["cal_weights"]
            assert w["mean_weight"] == pytest.approx(1.0) and w["groups"]["true"]["gap"] < 1.0
            for metric in ("logprob", "accuracy"):
                assert r["stage2"][key][seed]["cal"][metric]["all"] == pytest.approx(
                    r["stage2"][key][seed]["plain"][metric]["all"], abs=1e-5)
    for row in r["summary"]:
        diffs = [r["stage2"][row["condition"]][s]["cal"][row["metric"]]["all"]
                 - r["stage2"][row["condition"]][s]["plain"][row["metric"]]["all"] for s in ("0", "1")]
        assert row["difference"] == pytest.approx(statistics.fmean(diffs))
        image_differences = [r["stage2"][row["condition"]][s]["image_differences"][row["metric"]] for s in ("0", "1")]
        assert row["verdict"] == demo_verdicts.verdict(diffs, image_differences)["verdict"]
    from PIL import Image

    with Image.open(out / "demo.png") as im:
        assert im.format == "PNG" and im.size[0] > 600
    for key in keys:  # the first seed's CAL model of every condition, for `calplug inspect`
        ckpt = out / f"cal-model-noise-{key}"
        assert (ckpt / "config.json").is_file() and (ckpt / "calplug_vocab.json").is_file()
    assert (tmp_path / "cache" / "demo").is_dir()
