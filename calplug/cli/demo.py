"""``calplug demo``: the CAL paper's two-stage setting in miniature. No downloads, CPU, minutes.

Protocol (fixed before any result was seen; docs/demo.md has every number and why):

* Data (`calplug.cli.synthetic`): 32 x 32 images of one shape; the caption says size, colour,
  shape and position, then two words no image can predict. A corrupted caption has all four
  visual words replaced (at random, or systematically: red -> green).
* Stage 1 ("alignment"), per seed: a random-init tiny transformers Llava
  (`calplug.testing.tiny_llava`) trained with plain cross-entropy on clean captions until it uses
  the image. Cached under the user's cache folder, keyed by the stage-1 protocol.
* Stage 2 ("fine-tuning on noisy data"), per seed and condition: two copies of the same stage-1
  weights trained on the same batches of fresh images (each seen once), one plain and one with
  ``calplug.enable(model)``; vision tower frozen.
* Primary metric: mean log-probability of the true visual word, teacher-forced on clean held-out
  captions, per attribute and overall. Secondary: greedy visual-word accuracy.
* Verdict: paired CAL - plain over seeds; a difference counts only beyond its margin
  (Student's t times the standard error over seeds, at least 1.96 evaluation standard errors).

This module is the command: its options and the order of the work (runs, table, files). The
protocol is `demo_protocol`; the runs and the stage-1 cache `demo_training`; the metrics
`demo_metrics`; the paired statistics and verdicts `demo_verdicts`; the table and the plot
`demo_report`; the data `synthetic`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from ..errors import CALConfigError
from . import demo_decoding, demo_report, demo_training, demo_verdicts, synthetic
from .common import prepare_output_dir, quiet_transformers_bars, require_extras
from .demo_protocol import KINDS, Condition, Protocol


# -- command line ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="calplug-demo", help="output folder (default: ./calplug-demo)")
    parser.add_argument("--seed", type=int, default=0,
                        help="first seed; the run uses this and the following ones (default 0)")
    parser.add_argument("--full", action="store_true",
                        help="8 seeds; 0, 20, 40, 60 %% noise plus 40 %% systematic and memorised noise "
                             "(about half an hour of one CPU core)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1: the model is tiny, more threads rarely help)")
    parser.add_argument("--cache-dir", default=None,
                        help="where stage-1 weights are cached (default: $CALPLUG_CACHE_DIR, else "
                             "$XDG_CACHE_HOME/calplug, else ~/.cache/calplug)")
    parser.add_argument("--no-cache", action="store_true", help="train stage 1 every time; read and write no cache")
    parser.add_argument("--no-checkpoint", action="store_true",
                        help="do not save the first seed's CAL models (OUT/cal-model-noise-P, for `calplug inspect`)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    parser.add_argument("--decoding", action="store_true",
                        help="also answer the held-out images with contrastive decoding and print "
                             "its paired effect on visual-word accuracy (docs/decoding.md)")
    parser.add_argument("--audit", action="store_true",
                        help="instead: the dataset audit on the demo's world (AUROC of finding the contradicting "
                             "captions; training on the audit-filtered data), and an audit world for "
                             "`calplug audit` (docs/audit.md)")
    # Shortened runs, for tests and quick looks; the documented results use the defaults.
    parser.add_argument("--seeds", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--noise", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stage1-steps", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stage1-images", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memorised-images", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--eval-size", type=int, default=None, help=argparse.SUPPRESS)


def parse_conditions(text: str) -> tuple:
    """``"0,0.4,0.4:systematic"`` -> conditions."""
    conds = []
    for item in text.split(","):
        rate, _, kind = item.strip().partition(":")
        try:
            noise = float(rate)
        except ValueError:
            raise CALConfigError(f"--noise must be comma-separated rates in [0, 1], each optionally "
                                 f"followed by :systematic or :memorised; got {text!r}") from None
        kind = kind or "random"
        if kind not in KINDS:
            raise CALConfigError(f"--noise: unknown noise kind {kind!r} in {text!r}; use one of {KINDS}")
        conds.append(Condition(noise, kind))
    return tuple(conds)


def protocol_from_args(args) -> Protocol:
    proto = Protocol.full() if args.full else Protocol.default()
    n_seeds = len(proto.seeds) if args.seeds is None else args.seeds
    changes = dict(seeds=tuple(range(args.seed, args.seed + n_seeds)))
    for option, field in (("steps", "stage2_steps"), ("stage1_steps", "stage1_steps"),
                          ("stage1_images", "stage1_images"), ("memorised_images", "memorised_images"),
                          ("eval_size", "eval_size")):
        if getattr(args, option) is not None:
            changes[field] = getattr(args, option)
    if args.noise is not None:
        changes["conditions"] = parse_conditions(args.noise)
    proto = dataclasses.replace(proto, **changes)
    if (n_seeds < 1 or proto.stage1_steps < 1 or proto.stage2_steps < 1 or proto.eval_size < 1
            or proto.stage1_images < proto.batch_size or proto.memorised_images < proto.batch_size):
        raise CALConfigError("--seeds, --steps, --stage1-steps and --eval-size must be >= 1, "
                             f"--stage1-images and --memorised-images >= the batch size ({proto.batch_size})")
    if not proto.conditions or any(not 0.0 <= c.noise <= 1.0 for c in proto.conditions):
        raise CALConfigError(f"noise rates must lie in [0, 1], got {[c.noise for c in proto.conditions]}")
    if len({c.key for c in proto.conditions}) != len(proto.conditions):
        raise CALConfigError(f"--noise names a condition twice: {args.noise!r}")
    return proto


def run(args) -> int:
    require_extras()
    proto = protocol_from_args(args)
    if args.threads is not None and args.threads < 1:
        raise CALConfigError(f"--threads must be >= 1, got {args.threads}")
    threads = args.threads or 1
    torch.set_num_threads(threads)
    out = prepare_output_dir(args.out)
    cache = (None if args.no_cache else Path(args.cache_dir) if args.cache_dir
             else demo_training.default_cache_dir())
    if args.audit:
        from . import demo_audit

        return demo_audit.run(args, proto, out, cache, threads)
    extra = demo_decoding.evaluate if args.decoding else None
    result = demo_training.run_experiment(proto, show_progress=not args.no_progress, cache=cache,
                                          threads=threads, keep_models=not args.no_checkpoint,
                                          extra_eval=extra)
    models = result.pop("models", {})
    rows = demo_verdicts.paired_rows(result)
    table = demo_report.table(result, rows)
    result["summary"] = rows
    result["threads"] = threads
    result["versions"] = _versions()
    print(table)
    if args.decoding:
        decoding_rows = demo_decoding.paired_rows(result)
        result["decoding_summary"] = decoding_rows
        print("\n" + demo_decoding.table(result, decoding_rows))
    print(f"\nwall time {result['seconds']:.0f} s on {threads} thread(s)"
          + ("" if result["stage1_cache"] is None else f"; stage-1 cache {result['stage1_cache']}"))
    sys.stdout.flush()
    (out / "results.json").write_text(json.dumps(result, indent=1))
    demo_report.plot(result, rows, out / "demo.png")
    written = [str(out / "results.json"), str(out / "demo.png")]
    vocab = synthetic.Vocab()
    for key, state in models.items():
        model = demo_training.build_model(proto.seeds[0], vocab, proto)
        model.load_state_dict(state)
        save_checkpoint(model, vocab, checkpoint_path(out, key))
    if models:
        noisy = [c for c in proto.conditions if c.kind == "random" and c.noise > 0]
        first = checkpoint_path(out, min(noisy, key=lambda c: abs(c.noise - 0.4)).key if noisy
                                else proto.conditions[0].key)
        written.append(f"the first seed's CAL models {out / 'cal-model-noise-*'} "
                       f"(try: calplug inspect --model {first})")
    print("wrote " + ", ".join(written))
    return 0


def _versions() -> dict:
    import platform

    import transformers

    from .. import __version__

    return dict(calplug=__version__, torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(), cpu_capability=torch.backends.cpu.get_cpu_capability())


# -- checkpoints for `calplug inspect` ------------------------------------------------------------
def checkpoint_path(folder: Path, condition_key: str) -> Path:
    return Path(folder) / f"cal-model-noise-{condition_key}"


def save_checkpoint(model, vocab: synthetic.Vocab, path: Path) -> None:
    """``save_pretrained`` plus the word vocabulary (``calplug inspect --model PATH`` reads it)."""
    path.mkdir(parents=True, exist_ok=True)
    with quiet_transformers_bars():
        model.save_pretrained(path)
    vocab.save(path / "calplug_vocab.json")
