"""``calplug audit-bench``: what the audit costs. On the bench's LLaVA-shaped model and batch
(`calplug.cli.bench`, every size an option), interleaved repetitions of

* the audit of the batch: `calplug.audit_batch` (the main pass, the image-blind contrast pass over
  the text tokens, both sides' log-softmax, the per-sample statistics), and
* one plain no-grad forward of the same batch (the model's own forward, no labels),

both in training mode with dropout off, as the audit runs. Reported: the medians, the ratio of
audit to forward, the audit's samples per second, and the contrast pass timed inside the audit
(through the ``calplug_observe_contrast_pass`` hook, `bench.contrast_probe`). Reading and
formatting the data (images, the processor) is not in these figures: ``calplug audit`` prints its
own end-to-end samples per second (docs/audit.md).
"""
from __future__ import annotations

import json
import statistics

import torch

from .. import auditing
from ..scoring import network_mode
from . import bench


def benchmark_audit(cfg: bench.BenchConfig) -> dict:
    bench.validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = cfg.resolved_device()
    model = bench.build_model(cfg)
    batch = bench.build_batch(model, cfg)
    plain = {k: v for k, v in batch.items() if k != "labels"}

    def audit():
        auditing.audit_batch(model, batch)

    def forward():
        with torch.no_grad(), network_mode(model):
            model(**plain)

    times, _, contrast = bench.time_steps({"audit": audit, "forward": forward}, device, cfg.repeats, cfg.warmup)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        **bench.describe(cfg, model, batch),
        "times": times,
        "median_s": med,
        "audit_over_forward": med["audit"] / med["forward"],
        "samples_per_s": cfg.batch / med["audit"],
        "forward_samples_per_s": cfg.batch / med["forward"],
        "contrast_median_s": statistics.median(contrast["audit"]) if "audit" in contrast else None,
    }


def format_report(r: dict) -> str:
    cfg = r["config"]
    lines = bench.header_lines(r, "calplug audit-bench") + [
        f"timing: median of {cfg['repeats']} interleaved repetitions (+{cfg['warmup']} warm-up); "
        "training mode, dropout off, no grad", "",
        f"{'':<44}{'median s':>10}{'min s':>9}{'max s':>9}{'samples/s':>11}"]
    for name, label in (("audit", "audit (calplug.audit_batch)"), ("forward", "plain no-grad forward")):
        ts = r["times"][name]
        lines.append(f"{label:<44}{r['median_s'][name]:>10.3f}{min(ts):>9.3f}{max(ts):>9.3f}"
                     f"{cfg['batch'] / r['median_s'][name]:>11.2f}")
    lines += ["", f"audit / plain forward: {r['audit_over_forward']:.2f}"]
    if r["contrast_median_s"] is not None:
        lines.append(f"contrast pass inside the audit: {r['contrast_median_s']:.3f} s "
                     f"({r['contrast_median_s'] / r['median_s']['forward']:.2f} of the plain forward)")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    bench.add_model_arguments(parser)


def run(args) -> int:
    cfg = bench.checked_config(args)
    result = benchmark_audit(cfg)
    print(format_report(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
