"""``calplug demo``: a miniature of the CAL paper's Figure 3 -- accuracy as the share of
contradictory captions grows, with and without CAL. No downloads, CPU, a few minutes.

Protocol (fixed before any result was seen; docs/demo.md):

* Data (`calplug.cli.synthetic`): 32 x 32 images of one shape (sizes x colours x shapes x
  positions: 2 x 6 x 4 x 3); the caption says size, colour, shape and position, then two random
  words no image can predict. At noise rate p, a share p of the training captions has every visual
  word replaced by a wrong one. The evaluation set is clean and held out.
* Model: a random-init transformers ``LlavaForConditionalGeneration`` (`calplug.testing.tiny_llava`:
  CLIP tower 2 x 32, Llama decoder 2 x 64, 16 image tokens), word-level vocabulary.
* Training: identical for both methods -- same initial weights, data, batch order and steps --
  except that "CAL" calls ``calplug.enable(model)`` (default config: contrast="drop", alpha=1,
  beta=5, pool_window=3) and "plain" does not.
* Metric: greedy decoding from ``<bos> <image> describe :``; for each visual attribute the first
  generated word of that attribute must equal the truth. Accuracy = correct / (images x 4).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import torch

from . import prepare_output_dir, synthetic

METHODS = ("plain", "cal")
METHOD_LABELS = {"plain": "plain", "cal": "CAL"}


@dataclasses.dataclass
class Protocol:
    noise_rates: tuple = (0.0, 0.2, 0.4, 0.6)
    seeds: tuple = (0,)
    steps: int = 400
    batch_size: int = 32
    train_size: int = 1024
    eval_size: int = 512
    lr: float = 2e-3
    warmup: int = 20
    grad_clip: float = 1.0
    hidden: int = 64
    layers: int = 2

    @classmethod
    def default(cls) -> "Protocol":
        return cls()

    @classmethod
    def full(cls) -> "Protocol":
        return cls(noise_rates=(0.0, 0.2, 0.4, 0.6, 0.8), seeds=(0, 1, 2, 3, 4), steps=1000,
                   train_size=2048, eval_size=512)


# -- training and evaluation ----------------------------------------------------------------------
def build_model(seed: int, vocab: synthetic.Vocab, proto: Protocol):
    from ..testing import tiny_llava

    return tiny_llava(seed, vocab_size=len(vocab), hidden_size=proto.hidden, layers=proto.layers,
                      image_size=synthetic.IMAGE_SIZE, patch_size=synthetic.PATCH_SIZE)


def train(model, data: synthetic.CaptionSet, vocab: synthetic.Vocab, proto: Protocol, seed: int,
          *, cal: bool, progress=None) -> list[float]:
    """Train in place; returns the loss of every step (the CAL loss when ``cal``)."""
    import calplug

    if cal:  # the defaults, explicitly: a user's $CALPLUG_CONFIG does not change the demo
        calplug.enable(model, calplug.CALConfig())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=proto.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, proto.warmup))
        * 0.5 * (1 + math.cos(math.pi * min(s, proto.steps) / proto.steps)))
    g = torch.Generator().manual_seed(10_000 + seed)  # batch order: same for both methods
    order = torch.empty(0, dtype=torch.long)
    losses = []
    for _ in range(proto.steps):
        if order.numel() < proto.batch_size:
            order = torch.cat([order, torch.randperm(len(data), generator=g)])
        idx, order = order[:proto.batch_size], order[proto.batch_size:]
        out = model(**synthetic.batch(data, idx, vocab))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), proto.grad_clip)
        opt.step()
        sched.step()
        losses.append(out.loss.detach().item())
        if progress is not None:
            progress.update(1)
    if cal:
        calplug.disable(model)
    model.eval()
    return losses


@torch.no_grad()
def greedy(model, pixel_values: torch.Tensor, vocab: synthetic.Vocab, max_new: int = 14,
           chunk: int = 256) -> torch.Tensor:
    """Greedy decoding (argmax at every step) from ``<bos> <image> describe :``; ``[N, max_new]``."""
    was = model.training
    model.eval()
    outs = []
    for start in range(0, pixel_values.shape[0], chunk):
        px = pixel_values[start:start + chunk]
        ids = torch.tensor([synthetic.prompt_ids(vocab)] * px.shape[0])
        for _ in range(max_new):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        outs.append(ids[:, -max_new:])
    model.train(was)
    return torch.cat(outs)


def score(generated: torch.Tensor, data: synthetic.CaptionSet, vocab: synthetic.Vocab) -> dict:
    """Per attribute and overall: share of images whose first generated word of that attribute is
    the true one (no word of the attribute counts as wrong)."""
    correct = {a: 0 for a in synthetic.ATTRIBUTES}
    for row, scene in zip(generated.tolist(), data.scenes):
        words = vocab.decode(row)
        for a, values in synthetic.ATTRIBUTES.items():
            said = next((w for w in words if w in values), None)
            correct[a] += said == getattr(scene, a)
    n = len(data)
    result = {a: c / n for a, c in correct.items()}
    result["all"] = sum(correct.values()) / (n * len(correct))
    return result


# -- the experiment -------------------------------------------------------------------------------
def run_experiment(proto: Protocol, *, show_progress: bool = True, checkpoint: Path | None = None) -> dict:
    from tqdm.auto import tqdm

    vocab = synthetic.Vocab()
    total = len(proto.seeds) * len(proto.noise_rates) * len(METHODS) * proto.steps
    results = {m: {str(p): [] for p in proto.noise_rates} for m in METHODS}
    per_attribute = {m: {str(p): [] for p in proto.noise_rates} for m in METHODS}
    final_loss = {m: {str(p): [] for p in proto.noise_rates} for m in METHODS}
    t0 = time.perf_counter()
    with tqdm(total=total, desc="training", unit="step", disable=not show_progress,
              dynamic_ncols=True) as bar:
        for seed in proto.seeds:
            evalset = synthetic.make_set(proto.eval_size, seed=1_000_000 + seed, noise=0.0)
            for p in proto.noise_rates:
                data = synthetic.make_set(proto.train_size, seed=seed, noise=p)
                for method in METHODS:
                    bar.set_postfix_str(f"seed {seed} noise {p:.0%} {METHOD_LABELS[method]}")
                    torch.manual_seed(seed)
                    model = build_model(seed, vocab, proto)
                    losses = train(model, data, vocab, proto, seed, cal=method == "cal", progress=bar)
                    acc = score(greedy(model, evalset.pixel_values, vocab), evalset, vocab)
                    results[method][str(p)].append(acc["all"])
                    per_attribute[method][str(p)].append(acc)
                    final_loss[method][str(p)].append(statistics.fmean(losses[-20:]))
                    if checkpoint is not None and method == "cal" and seed == proto.seeds[0]:
                        save_checkpoint(model, vocab, checkpoint_path(checkpoint, p))
    return dict(protocol=dataclasses.asdict(proto), accuracy=results, per_attribute=per_attribute,
                final_train_loss=final_loss, eval_words=proto.eval_size * len(synthetic.ATTRIBUTES),
                seconds=time.perf_counter() - t0, calplug_config=_cal_config())


def _cal_config() -> dict:
    from ..config import CALConfig

    return CALConfig().to_dict()


def checkpoint_path(folder: Path, noise: float) -> Path:
    return Path(folder) / f"cal-model-noise-{noise:g}"


def save_checkpoint(model, vocab: synthetic.Vocab, path: Path) -> None:
    """``save_pretrained`` plus the word vocabulary (``calplug inspect --model PATH`` reads it)."""
    from transformers.utils import logging as hf_logging

    path.mkdir(parents=True, exist_ok=True)
    bars = getattr(hf_logging, "is_progress_bar_enabled", lambda: False)()
    if bars:  # no second progress bar under the demo's own
        hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    vocab.save(path / "calplug_vocab.json")


def verdict(plain: list[float], cal: list[float], eval_words: int) -> tuple[str, float, float]:
    """(verdict, mean difference CAL - plain, margin). A difference counts only beyond the margin:
    twice the larger of the seeds' standard error of the paired difference and the evaluation's
    binomial standard error of a difference of two accuracies."""
    diffs = [c - p for c, p in zip(cal, plain)]
    d = statistics.fmean(diffs)
    se_seeds = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    acc = min(max(statistics.fmean(plain + cal), 1e-3), 1 - 1e-3)
    se_eval = math.sqrt(2 * acc * (1 - acc) / (eval_words * len(diffs)))
    margin = 2 * max(se_seeds, se_eval)
    if d > margin:
        return "CAL helps", d, margin
    if d < -margin:
        return "CAL hurts", d, margin
    return "no clear difference", d, margin


def summarise(result: dict) -> tuple[str, list[dict]]:
    proto = result["protocol"]
    rows = []
    for p in proto["noise_rates"]:
        plain, cal = result["accuracy"]["plain"][str(p)], result["accuracy"]["cal"][str(p)]
        v, d, margin = verdict(plain, cal, result["eval_words"])
        rows.append(dict(noise=p, plain=statistics.fmean(plain), cal=statistics.fmean(cal),
                         plain_sd=statistics.stdev(plain) if len(plain) > 1 else 0.0,
                         cal_sd=statistics.stdev(cal) if len(cal) > 1 else 0.0,
                         difference=d, margin=margin, verdict=v))
    n = len(proto["seeds"])
    note = ("" if n > 1 else "\n(1 seed: the margin covers evaluation sampling only; --full runs 5 seeds)")
    lines = [f"Visual-word accuracy on {proto['eval_size']} clean held-out images "
             f"(mean of {n} seed{'s' if n > 1 else ''}; {proto['steps']} steps each)",
             f"{'noise':>6}  {'plain':>6}  {'CAL':>6}  {'CAL-plain':>9}  verdict"]
    for r in rows:
        lines.append(f"{r['noise']:>6.0%}  {r['plain']:>6.3f}  {r['cal']:>6.3f}  "
                     f"{r['difference']:>+9.3f}  {r['verdict']} (margin {r['margin']:.3f})")
    return "\n".join(lines) + note, rows


def plot(result: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    proto = result["protocol"]
    x = [100 * p for p in proto["noise_rates"]]
    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=120)
    for method, colour, marker in (("plain", "#888888", "o"), ("cal", "#d62728", "s")):
        means = [r[method] for r in rows]
        sds = [r[f"{method}_sd"] for r in rows]
        ax.errorbar(x, means, yerr=sds if len(proto["seeds"]) > 1 else None, color=colour,
                    marker=marker, capsize=3, label=METHOD_LABELS[method])
        for seed_i in range(len(proto["seeds"])):
            ax.scatter(x, [result["accuracy"][method][str(p)][seed_i] for p in proto["noise_rates"]],
                       color=colour, alpha=0.25, s=10)
    ax.set_xlabel("contradictory training captions (%)")
    ax.set_ylabel("visual-word accuracy (clean test)")
    ax.set_title("calplug demo: tiny Llava, synthetic shapes")
    ax.set_xticks(x)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- command line ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="calplug-demo", help="output folder (default: ./calplug-demo)")
    parser.add_argument("--seed", type=int, default=0,
                        help="first seed; the run uses this and the following ones (default 0)")
    parser.add_argument("--full", action="store_true",
                        help="5 seeds, 1000 steps, 5 noise rates, a larger training set (about 15x longer)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1: the model is tiny, more threads rarely help)")
    parser.add_argument("--no-checkpoint", action="store_true",
                        help="do not save the first seed's CAL models (OUT/cal-model-noise-P, for `calplug inspect`)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    # Shortened runs, for tests and quick looks; the documented result uses the defaults.
    parser.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seeds", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--noise", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--train-size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--eval-size", type=int, default=None, help=argparse.SUPPRESS)


def protocol_from_args(args) -> Protocol:
    from ..errors import CALConfigError

    proto = Protocol.full() if args.full else Protocol.default()
    n_seeds = len(proto.seeds) if args.seeds is None else args.seeds
    changes = dict(seeds=tuple(range(args.seed, args.seed + n_seeds)))
    if args.steps is not None:
        changes["steps"] = args.steps
    if args.train_size is not None:
        changes["train_size"] = args.train_size
    if args.eval_size is not None:
        changes["eval_size"] = args.eval_size
    if args.noise is not None:
        try:
            changes["noise_rates"] = tuple(float(x) for x in args.noise.split(","))
        except ValueError:
            raise CALConfigError(f"--noise must be comma-separated numbers in [0, 1], got {args.noise!r}")
    proto = dataclasses.replace(proto, **changes)
    if proto.steps < 1 or n_seeds < 1 or proto.train_size < proto.batch_size or proto.eval_size < 1:
        raise CALConfigError("--steps and --seeds must be >= 1, --train-size >= the batch size "
                             f"({proto.batch_size}) and --eval-size >= 1")
    if not proto.noise_rates or any(not 0.0 <= p <= 1.0 for p in proto.noise_rates):
        raise CALConfigError(f"noise rates must lie in [0, 1], got {proto.noise_rates}")
    return proto


def run(args) -> int:
    synthetic.require_extras()
    proto = protocol_from_args(args)
    threads = args.threads or 1
    torch.set_num_threads(threads)
    out = prepare_output_dir(args.out)
    ckpt = None if args.no_checkpoint else out
    result = run_experiment(proto, show_progress=not args.no_progress, checkpoint=ckpt)
    table, rows = summarise(result)
    result["summary"] = rows
    result["threads"] = threads
    result["versions"] = _versions()
    (out / "results.json").write_text(json.dumps(result, indent=1))
    plot(result, rows, out / "accuracy_vs_noise.png")
    print(table)
    print(f"wall time {result['seconds']:.0f} s on {threads} thread(s)")
    print(f"wrote {out / 'results.json'}, {out / 'accuracy_vs_noise.png'}"
          + ("" if ckpt is None else f" and the first seed's CAL models, {checkpoint_path(ckpt, proto.noise_rates[0])} "
                                     f"and so on (try: calplug inspect --model {checkpoint_path(ckpt, proto.noise_rates[0])})"))
    return 0


def _versions() -> dict:
    import platform

    import transformers

    from .. import __version__

    return dict(calplug=__version__, torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version())
