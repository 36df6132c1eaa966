"""`calplug bench`: runs end to end on a tiny LLaVA-shaped model, its arithmetic and its memory
method hold, and its floor is exactly the work of the drop contrast pass."""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from calplug import cli
from calplug.cli import bench
from calplug.errors import CALConfigError

TINY = ["--image-tokens", "16", "--text-tokens", "40", "--text-before-image", "5", "--vocab", "2000",
        "--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2",
        "--layers", "2", "--vision-hidden", "32", "--repeats", "3", "--warmup", "1",
        "--loss-chunk", "32", "--device", "cpu", "--threads", "1"]


def tiny_config(**overrides) -> bench.BenchConfig:
    values = dict(device="cpu", image_tokens=16, text_tokens=40, text_before_image=5, vocab=2000,
                  hidden=64, intermediate=128, heads=4, kv_heads=2, layers=2, vision_hidden=32,
                  repeats=1, warmup=0)
    values.update(overrides)
    return bench.BenchConfig(**values)


def test_bench_command_reports_every_variant(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", *TINY, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for label in bench.LABELS.values():
        assert label.format(chunk=32) in text
    assert "(cal - plain) / floor" in text
    r = json.loads(out.read_text())
    assert set(r["times"]) == set(bench.VARIANTS)
    assert all(len(ts) == 3 and min(ts) > 0 for ts in r["times"].values())
    med = {k: statistics.median(v) for k, v in r["times"].items()}
    assert r["median_s"] == pytest.approx(med)
    for name in ("cal_default", "cal_faithful", "cal_chunked"):
        assert r["extra_over_floor"][name] == pytest.approx((med[name] - med["plain"]) / med["floor"])
        assert r["overhead_vs_plain"][name] == pytest.approx(med[name] / med["plain"] - 1)
    # The contrast pass is timed inside every CAL step, and only there.
    assert set(r["contrast_times"]) == {"cal_default", "cal_faithful", "cal_chunked"}
    assert all(len(ts) == 3 and 0 < min(ts) for ts in r["contrast_times"].values())
    for name, ts in r["contrast_times"].items():
        assert all(c < t for c, t in zip(ts, r["times"][name]))
    # Shape of the batch: 2 samples, 40 and 24 text tokens, 16 image tokens each.
    assert r["shape"]["text_tokens"] == [40, 24]
    assert r["shape"]["seq_len"] == 56
    # Peak memory: a training step allocates at least its fp32 logits [B, L, V] (an independent
    # lower bound); the floor (no grad, no logits) far less.
    peak = r["peak_bytes"]
    logits_bytes = 2 * 56 * 2000 * 4
    assert peak["plain"] >= logits_bytes
    assert peak["floor"] < logits_bytes
    # The memory target on this model: the default CAL step within 5 % of plain.
    assert peak["cal_default"] <= 1.05 * peak["plain"]
    # The chunked loss never holds [B, L, V] logits: below the plain step (which holds several).
    assert peak["cal_chunked"] < peak["plain"] - logits_bytes
    assert r["peak_vs_plain"]["cal_default"] == pytest.approx(peak["cal_default"] / peak["plain"] - 1)


def test_cpu_peak_memory_sees_transients_and_backward():
    a = torch.randn(256, 1024, requires_grad=True)  # 1 MiB

    def transient():
        big = torch.empty(16, 1024, 1024)           # 64 MiB, freed at once
        del big
        torch.empty(1024, 1024)                     # 4 MiB

    def backward():
        (a * 3.0).exp().sum().backward()            # exp saves its 1 MiB output; grads 1 MiB each

    mib = 2 ** 20
    assert bench.cpu_peak_memory(transient) == pytest.approx(64 * mib, rel=1e-3)
    peak = bench.cpu_peak_memory(backward)
    assert 2 * mib <= peak <= 6 * mib
    assert a.grad is not None


def test_floor_is_exactly_the_drop_contrast_pass():
    """The floor's decoder inputs (built by the bench, independently of calplug's planner) give
    the same hidden states as the decoder call of the drop contrast pass."""
    import calplug

    cfg = tiny_config()
    model = bench.build_model(cfg)
    batch = bench.build_batch(model, cfg)
    from calplug.integrations import compat

    decoder, _ = compat.vlm_decoder_and_head(model)
    outputs = []
    handle = decoder.register_forward_hook(lambda m, a, o: outputs.append(o.last_hidden_state))
    try:
        with calplug.enabled(model, contrast="drop"):
            model(**batch)
    finally:
        handle.remove()
    assert len(outputs) == 2
    contrast = outputs[1]
    floor_kwargs = bench.floor_inputs(model, batch)
    with torch.no_grad():
        floor = decoder(**floor_kwargs).last_hidden_state
    assert contrast.shape == floor.shape
    keep = floor_kwargs["attention_mask"].bool()
    torch.testing.assert_close(contrast[keep], floor[keep], rtol=1e-5, atol=1e-5)
    # and the positions it keeps are the original ones (the text after the image starts at 5 + 16)
    assert int(floor_kwargs["position_ids"][0, 5]) == 5 + 16


def test_contrast_probe_times_each_contrast_pass_through_the_observer_hook():
    """One duration per contrast pass (one per CAL forward, none in a plain one), recorded by a
    plugin that is gone after the block."""
    import calplug
    from calplug import plugins

    cfg = tiny_config()
    model = bench.build_model(cfg)
    batch = bench.build_batch(model, cfg)
    registered = set(plugins.get_plugin_manager().get_plugins())
    with bench.contrast_probe(torch.device("cpu")) as seconds:
        assert len(plugins.get_plugin_manager().get_plugins()) == len(registered) + 1
        model(**batch)                                   # plain: no contrast pass
        assert seconds == []
        with calplug.enabled(model):
            model(**batch)
            model(**batch)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    assert set(plugins.get_plugin_manager().get_plugins()) == registered


def test_batch_layout_and_labels():
    cfg = tiny_config(batch=3)
    model = bench.build_model(cfg)
    batch = bench.build_batch(model, cfg)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    image = ids == model.config.image_token_index
    assert image.sum(1).tolist() == [16, 16, 16]
    assert image[:, 5:21].all()                                   # right after the system prompt
    assert mask.sum(1).tolist() == [56, 40, 24]
    assert (labels[image] == -100).all() and (labels[mask == 0] == -100).all()
    assert (labels[:, :5] == -100).all()                          # the prompt is not supervised
    # the answer (the last half of the text after the prompt) is supervised
    assert int((labels[0] != -100).sum()) == round(0.5 * (40 - 5))


@pytest.mark.parametrize("args, message", [
    (["--image-tokens", "500"], "square"),
    (["--hidden", "66", "--heads", "4"], "multiple"),
    (["--repeats", "0"], "--repeats"),
])
def test_bad_options_raise_clear_errors(args, message):
    with pytest.raises(CALConfigError, match=message):
        cli.main(["bench", *TINY, *args, "--no-memory", "--debug"])


def test_cuda_requested_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(CALConfigError, match="--device cpu"):
        cli.main(["bench", *TINY[:-4], "--device", "cuda", "--no-memory", "--debug"])
