"""The audit's evidence and throughput commands: ``calplug demo --audit`` (a shortened run: its
tables follow its results, its filter keeps exactly the samples scoring >= 0, and ``calplug
audit`` on the audit world it writes gives the scores the experiment used) and ``calplug
audit-bench`` (its arithmetic)."""
from __future__ import annotations

import json
import statistics

import pytest
from calplug import cli
from calplug.cli import bench, audit_bench, demo_audit, demo_training, synthetic
from calplug.cli.demo_protocol import Condition, Protocol
from _skips import importorskip

importorskip("tokenizers", "tokenizers", "it is a transformers dependency (pip install tokenizers); it builds the audit world's tokenizer")


def test_auroc_counts_pairs_and_half_the_ties():
    assert demo_audit.auroc([0, 1, 2, 3], [True, False, True, False]) == 0.75   # 3 of 4 pairs in order
    assert demo_audit.auroc([1, 1], [True, False]) == 0.5
    assert demo_audit.auroc([5, 1, 2], [True, False, False]) == 0.0


def test_one_word_noise_replaces_exactly_one_visual_word():
    proto = Protocol(stage2_steps=4)
    data, changed = demo_audit.training_set(0, Condition(0.5, "one-word"), proto)
    clean, _ = demo_audit.training_set(0, Condition(0.0), proto)
    slots = {s: a for a, s in synthetic.VISUAL_SLOTS.items()}
    assert sum(c is not None for c in changed) == round(0.5 * len(data)) == int(data.corrupted.sum())
    for caption, truth, attribute in zip(data.captions, clean.captions, changed):
        differ = [k for k, (a, b) in enumerate(zip(caption, truth)) if a != b]
        assert [slots[k] for k in differ] == ([] if attribute is None else [attribute])


def test_demo_audit_short_run(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--audit", "--out", str(out), "--seeds", "1", "--noise", "0.4,0.4:systematic",
            "--stage1-steps", "40", "--stage1-images", "256", "--steps", "4", "--eval-size", "32",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    result = json.loads((out / "audit_results.json").read_text())
    assert set(result["auroc"]) == set(result["training"]) == {"0.4", "0.4-systematic"}
    for key in ("0.4", "0.4-systematic"):
        f = result["filter"][key]["0"]
        assert f["kept"] + f["dropped"] == 128 and f["corrupted"] == round(0.4 * 128)
        assert f["corrupted_dropped"] + f["corrupted_kept"] == f["corrupted"]
        runs = result["training"][key]["0"]
        assert runs["plain"]["images"] == runs["cal"]["images"] == 128 and runs["plain"]["steps"] == 4
        assert runs["plain_filtered"]["images"] == f["kept"] and runs["plain_filtered"]["steps"] == max(1, f["kept"] // 32)
        assert all(0.0 <= v <= 1.0 for v in result["auroc"][key]["0"].values())
    row = next(line for line in text.splitlines() if line.startswith("40% systematic") and "." in line)
    assert f"{result['auroc']['0.4-systematic']['0']['mean_gain']:.3f}" in row
    assert "CAL, filtered - plain, filtered" in text and "paired by seed" in text
    # The command on the audit world gives the records the experiment scored (DataLoader path).
    world = out / "audit-world"
    truth = json.loads((world / "truth.json").read_text())
    assert cli.main(["audit", "--model", str(world / "model"), "--data", str(world / "train.json"),
                     "--out", str(world / "audit"), "--no-progress", "--min-score", "0"]) == 0
    found = [json.loads(x) for x in (world / "audit" / "scores.jsonl").read_text().splitlines()]
    proto = Protocol(stage1_steps=40, stage1_images=256, stage2_steps=4, eval_size=32, seeds=(0,))
    data, _ = demo_audit.training_set(0, Condition(0.4), proto)
    assert truth["contradicts"] == data.corrupted.tolist()
    model = demo_training.build_model(0, synthetic.Vocab(), proto)
    model.load_state_dict(demo_training.load_stage1(demo_training.stage1_folder(tmp_path / "cache", proto, 1), 0))
    expected = demo_audit.score_sets(model, {"0.4": data}, synthetic.Vocab())["0.4"]
    assert [r["score"] for r in found] == pytest.approx([r["score"] for r in expected], abs=1e-5)
    kept = json.loads((world / "audit" / "filtered.json").read_text())
    assert len(kept) == result["filter"]["0.4"]["0"]["kept"]


def test_audit_bench_reports_the_ratio_to_a_plain_forward(tmp_path, capsys):
    out = tmp_path / "bench.json"
    tiny = ["--image-tokens", "16", "--text-tokens", "40", "--text-before-image", "5", "--vocab", "2000",
            "--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2", "--layers", "2",
            "--vision-hidden", "32", "--repeats", "3", "--warmup", "1", "--device", "cpu", "--threads", "1"]
    assert cli.main(["audit-bench", *tiny, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    r = json.loads(out.read_text())
    med = {k: statistics.median(v) for k, v in r["times"].items()}
    assert set(med) == {"audit", "forward"} and all(len(v) == 3 for v in r["times"].values())
    assert r["audit_over_forward"] == pytest.approx(med["audit"] / med["forward"])
    assert r["samples_per_s"] == pytest.approx(2 / med["audit"])
    assert 0 < r["contrast_median_s"] < med["audit"]
    assert f"audit / plain forward: {r['audit_over_forward']:.2f}" in text
    assert text.startswith("calplug audit-bench: device=cpu")


def test_audit_bench_times_the_audit_of_the_bench_batch():
    """What is timed is the audit of the bench's batch: one record per sample, scored."""
    cfg = bench.BenchConfig(device="cpu", image_tokens=16, text_tokens=40, text_before_image=5, vocab=2000,
                            hidden=64, intermediate=128, heads=4, kv_heads=2, layers=2, vision_hidden=32)
    model = bench.build_model(cfg)
    records = audit_bench.auditing.audit_batch(model, bench.build_batch(model, cfg))
    assert len(records) == 2 and all(r["score"] is not None and r["tokens"] > 0 for r in records)
