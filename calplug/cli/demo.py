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
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import prepare_output_dir, synthetic

METHODS = ("plain", "cal")
METHOD_LABELS = {"plain": "plain", "cal": "CAL"}
METRICS = ("logprob", "accuracy")
METRIC_TITLES = {
    "logprob": "mean log-probability of the true visual word (teacher-forced, clean captions; higher is better)",
    "accuracy": "greedy visual-word accuracy (secondary)",
}
KINDS = ("random", "systematic", "memorised")
# Bumped when the data, the model or the stage-1 training changes in a way the protocol's
# numbers do not show: it is part of the stage-1 cache key.
STAGE1_RECIPE = 1


@dataclasses.dataclass(frozen=True)
class Condition:
    """A stage-2 training set: a share ``noise`` of contradictory captions, corrupted at random
    or systematically, on fresh images (each seen once) or on a few images seen many times."""
    noise: float
    kind: str = "random"

    @property
    def key(self) -> str:
        return f"{self.noise:g}" if self.kind == "random" else f"{self.noise:g}-{self.kind}"

    @property
    def label(self) -> str:
        return f"{self.noise:.0%}" if self.kind == "random" else f"{self.noise:.0%} {self.kind}"


@dataclasses.dataclass
class Protocol:
    seeds: tuple = (0, 1, 2)
    conditions: tuple = (Condition(0.0), Condition(0.4))
    batch_size: int = 32
    stage1_steps: int = 800
    stage1_images: int = 8192
    stage1_lr: float = 2e-3
    stage1_warmup: int = 20
    stage2_steps: int = 200          # fresh images: stage2_steps x batch_size, each seen once
    stage2_lr: float = 1e-3
    stage2_warmup: int = 10
    memorised_images: int = 320      # the memorised condition: these, seen stage2_steps x batch / this times
    eval_size: int = 512
    grad_clip: float = 1.0
    hidden: int = 64
    layers: int = 2
    greedy_tokens: int = 14

    @classmethod
    def default(cls) -> "Protocol":
        return cls()

    @classmethod
    def full(cls) -> "Protocol":
        return cls(seeds=tuple(range(8)),
                   conditions=(Condition(0.0), Condition(0.2), Condition(0.4), Condition(0.6),
                               Condition(0.4, "systematic"), Condition(0.4, "memorised")))

    def stage1_fields(self) -> dict:
        """What the stage-1 weights depend on (the cache key)."""
        return dict(batch_size=self.batch_size, steps=self.stage1_steps, images=self.stage1_images,
                    lr=self.stage1_lr, warmup=self.stage1_warmup, grad_clip=self.grad_clip,
                    hidden=self.hidden, layers=self.layers, recipe=STAGE1_RECIPE)


# Each seed's three image sets come from separate random streams (make_set seeds).
STAGE1_STREAM, STAGE2_STREAM, EVAL_STREAM = 100_000, 200_000, 1_000_000


# -- model and training ---------------------------------------------------------------------------
def build_model(seed: int, vocab: synthetic.Vocab, proto: Protocol):
    from ..testing import tiny_llava

    return tiny_llava(seed, vocab_size=len(vocab), hidden_size=proto.hidden, layers=proto.layers,
                      image_size=synthetic.IMAGE_SIZE, patch_size=synthetic.PATCH_SIZE)


def vision_tower(model):
    inner = getattr(model, "model", None)
    return getattr(inner, "vision_tower", None) or model.vision_tower


def schedule(n_images: int, steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """The index batches of a run: passes over ``n_images`` in a fresh random order each, cut
    into ``steps`` batches. A function of its arguments only, so two runs given the same
    arguments see the same batches."""
    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    batches = []
    for _ in range(steps):
        if order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(n_images, generator=g)])
        batches.append(order[:batch_size])
        order = order[batch_size:]
    return batches


def train(model, data: synthetic.CaptionSet, batches: list, vocab: synthetic.Vocab, *, lr: float,
          warmup: int, grad_clip: float, cal: bool, progress=None, stats: dict | None = None) -> list[float]:
    """Train the parameters that require grad, in place, on ``batches`` (index tensors into
    ``data``); returns the loss of every step (the CAL loss when ``cal``). With ``cal`` and a
    ``stats`` dict, the CAL weights of every step are summed into it (``weight_stats``)."""
    import calplug

    if cal:  # the defaults, explicitly: a user's $CALPLUG_CONFIG does not change the demo
        calplug.enable(model, calplug.CALConfig())
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    steps = len(batches)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    losses = []
    try:
        for idx in batches:
            out = model(**synthetic.batch(data, idx, vocab))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            losses.append(out.loss.detach().item())
            if cal and stats is not None:
                add_weight_stats(stats, out.cal_gaps, out.cal_weights, data.corrupted[idx])
            if progress is not None:
                progress.update(1)
    finally:
        if cal:
            calplug.disable(model)
    model.eval()
    return losses


def run_stage1(seed: int, vocab: synthetic.Vocab, proto: Protocol, *, progress=None) -> dict:
    """Stage 1 of ``seed``: plain training of ``tiny_llava(seed)`` on clean captions; its state dict."""
    model = build_model(seed, vocab, proto)
    data = synthetic.make_set(proto.stage1_images, seed=STAGE1_STREAM + seed, noise=0.0)
    batches = schedule(len(data), proto.stage1_steps, proto.batch_size, seed=STAGE1_STREAM + seed)
    train(model, data, batches, vocab, lr=proto.stage1_lr, warmup=proto.stage1_warmup,
          grad_clip=proto.grad_clip, cal=False, progress=progress)
    return model.state_dict()


def stage2_data(seed: int, condition: Condition, proto: Protocol) -> tuple[synthetic.CaptionSet, list]:
    """The stage-2 captions of ``condition`` and their batches (the same for both methods)."""
    fresh = proto.stage2_steps * proto.batch_size
    n = proto.memorised_images if condition.kind == "memorised" else fresh
    corruption = "systematic" if condition.kind == "systematic" else "random"
    data = synthetic.make_set(n, seed=STAGE2_STREAM + seed, noise=condition.noise, corruption=corruption)
    return data, schedule(n, proto.stage2_steps, proto.batch_size, seed=STAGE2_STREAM + seed)


def run_stage2(stage1_state: dict, seed: int, data: synthetic.CaptionSet, batches: list,
               vocab: synthetic.Vocab, proto: Protocol, *, cal: bool, progress=None, stats=None):
    """Stage 2 from the stage-1 weights: vision tower frozen, projector and language model trained."""
    model = build_model(seed, vocab, proto)
    model.load_state_dict(stage1_state)
    for p in vision_tower(model).parameters():
        p.requires_grad_(False)
    losses = train(model, data, batches, vocab, lr=proto.stage2_lr, warmup=proto.stage2_warmup,
                   grad_clip=proto.grad_clip, cal=cal, progress=progress, stats=stats)
    return model, losses


# -- what CAL did to the weights ------------------------------------------------------------------
WEIGHT_GROUPS = ("true", "wrong", "filler")


def new_weight_stats() -> dict:
    z = dict(n=0, gap=0.0, clamped=0.0, pooled=0.0)
    return dict(groups={g: dict(z) for g in WEIGHT_GROUPS},
                attributes={a: dict(z) for a in synthetic.ATTRIBUTES},
                total_weight=0.0, tokens=0)


@torch.no_grad()
def add_weight_stats(stats: dict, gaps: torch.Tensor, weights: torch.Tensor, corrupted: torch.Tensor) -> None:
    """Sums, over one step, of the gap, the clamped weight and the pooled (final) weight of the
    visual words of clean captions ("true"), of corrupted captions ("wrong"), and of the filler
    words; per attribute (true words only) and the summed weight of every supervised token."""
    from ..config import CALConfig

    cfg = CALConfig()
    row = lambda slot: synthetic.PROMPT_LENGTH + slot - 1  # the row whose logits predict caption word ``slot``
    gaps, weights = gaps.float(), weights.float()
    clamped = gaps.clamp(cfg.alpha, cfg.beta)
    rows = slice(row(0), row(synthetic.CAPTION_LENGTH))
    stats["total_weight"] += float(weights[:, rows].sum())
    stats["tokens"] += weights[:, rows].numel()

    def add(entry, sel, col):
        entry["n"] += int(sel.sum())
        entry["gap"] += float(gaps[sel, col].sum())
        entry["clamped"] += float(clamped[sel, col].sum())
        entry["pooled"] += float(weights[sel, col].sum())

    for a, slot in synthetic.VISUAL_SLOTS.items():
        add(stats["groups"]["true"], ~corrupted, row(slot))
        add(stats["groups"]["wrong"], corrupted, row(slot))
        add(stats["attributes"][a], ~corrupted, row(slot))
    for slot in synthetic.FILLER_SLOTS:
        add(stats["groups"]["filler"], torch.ones_like(corrupted), row(slot))


def weight_summary(stats: dict) -> dict:
    """Means of the sums ``add_weight_stats`` kept; each attribute's share of the summed weight
    (per token of that attribute in a caption; plain cross-entropy gives each token 1/14)."""
    def mean(e):
        return {k: (e[k] / e["n"] if e["n"] else None) for k in ("gap", "clamped", "pooled")} | {"n": e["n"]}

    per_token = stats["total_weight"] / stats["tokens"] if stats["tokens"] else None
    return dict(groups={g: mean(e) for g, e in stats["groups"].items()},
                attributes={a: mean(e) for a, e in stats["attributes"].items()},
                mean_weight=per_token,
                share={a: (e["pooled"] / e["n"]) / (per_token * synthetic.CAPTION_LENGTH)
                       if e["n"] and per_token else None for a, e in stats["attributes"].items()})


# -- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def true_word_logprobs(model, data: synthetic.CaptionSet, vocab: synthetic.Vocab, chunk: int = 256) -> torch.Tensor:
    """``[N, 4]``: log p(true visual word | prompt with the image, clean caption before it), for
    each image of ``data`` (whose captions must be clean) and each attribute in
    ``synthetic.ATTRIBUTES`` order."""
    if bool(data.corrupted.any()):
        raise ValueError("true_word_logprobs needs clean captions")
    was = model.training
    model.eval()
    rows = torch.tensor([synthetic.PROMPT_LENGTH + slot - 1 for slot in synthetic.VISUAL_SLOTS.values()])
    out = []
    for start in range(0, len(data), chunk):
        b = synthetic.batch(data, list(range(start, min(start + chunk, len(data)))), vocab)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       pixel_values=b["pixel_values"]).logits[:, rows].float()
        targets = b["input_ids"][:, rows + 1]
        out.append(logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1))
    model.train(was)
    return torch.cat(out)


@torch.no_grad()
def greedy(model, pixel_values: torch.Tensor, vocab: synthetic.Vocab, max_new: int = 14,
           chunk: int = 256) -> torch.Tensor:
    """Greedy decoding (arg max at every step) from ``<bos> <image> describe :``; ``[N, max_new]``.
    One pass over the prompt with the image, then one token at a time from the key/value cache."""
    import inspect

    # transformers 5 calls the key/value cache `cache`, earlier releases `past_key_values`
    cache = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    was = model.training
    model.eval()
    outs = []
    for start in range(0, pixel_values.shape[0], chunk):
        px = pixel_values[start:start + chunk]
        ids = torch.tensor([synthetic.prompt_ids(vocab)] * px.shape[0])
        mask = torch.ones_like(ids)
        out = model(input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=True)
        new = []
        for k in range(max_new):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            new.append(nxt)
            if k + 1 == max_new:
                break
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = model(input_ids=nxt, attention_mask=mask, use_cache=True, **{cache: getattr(out, cache)})
        outs.append(torch.cat(new, dim=1))
    model.train(was)
    return torch.cat(outs)


def correct_words(generated: torch.Tensor, data: synthetic.CaptionSet, vocab: synthetic.Vocab) -> torch.Tensor:
    """``[N, 4]`` bool: is the first generated word of each attribute the true one (no word of
    the attribute counts as wrong)."""
    rows = []
    for ids, scene in zip(generated.tolist(), data.scenes):
        words = vocab.decode(ids)
        rows.append([next((w for w in words if w in values), None) == getattr(scene, a)
                     for a, values in synthetic.ATTRIBUTES.items()])
    return torch.tensor(rows, dtype=torch.bool)


def score(generated: torch.Tensor, data: synthetic.CaptionSet, vocab: synthetic.Vocab) -> dict:
    """Per attribute and overall: share of images whose first generated word of that attribute is
    the true one."""
    return per_attribute(correct_words(generated, data, vocab).float())


def per_attribute(values: torch.Tensor) -> dict:
    """Means of an ``[N, 4]`` table per attribute and overall."""
    result = {a: float(values[:, i].mean()) for i, a in enumerate(synthetic.ATTRIBUTES)}
    result["all"] = float(values.mean())
    return result


def evaluate(model, evalset: synthetic.CaptionSet, vocab: synthetic.Vocab, proto: Protocol) -> dict:
    """Both metrics per attribute and overall, and each image's overall score (for paired
    per-image differences)."""
    logprob = true_word_logprobs(model, evalset, vocab)
    correct = correct_words(greedy(model, evalset.pixel_values, vocab, proto.greedy_tokens), evalset, vocab).float()
    return dict(logprob=per_attribute(logprob), accuracy=per_attribute(correct),
                per_image=dict(logprob=logprob.mean(1), accuracy=correct.mean(1)))


# -- the stage-1 cache ----------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """$CALPLUG_CACHE_DIR, else $XDG_CACHE_HOME/calplug, else ~/.cache/calplug."""
    if os.environ.get("CALPLUG_CACHE_DIR"):
        return Path(os.environ["CALPLUG_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "calplug"


def stage1_key(proto: Protocol, threads: int) -> str:
    import transformers

    fields = dict(proto.stage1_fields(), torch=torch.__version__, transformers=transformers.__version__,
                  threads=threads)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def stage1_folder(cache: Path, proto: Protocol, threads: int) -> Path:
    return Path(cache) / "demo" / f"stage1-{stage1_key(proto, threads)}"


def usable_cache(cache: Path | None, proto: Protocol, threads: int) -> Path | None:
    """The stage-1 cache folder, created and checked writable now; None (with a warning) when it
    cannot be written: the demo then trains stage 1 every time instead of failing."""
    if cache is None:
        return None
    folder = stage1_folder(cache, proto, threads)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        print(f"calplug demo: warning: stage-1 cache {str(folder)!r} cannot be written "
              f"({error.strerror or error}); training stage 1 without caching (--cache-dir DIR "
              "or $CALPLUG_CACHE_DIR chooses another folder)", file=sys.stderr)
        return None
    (folder / "protocol.json").write_text(json.dumps(
        dict(proto.stage1_fields(), key=stage1_key(proto, threads), threads=threads), indent=1))
    return folder


def load_stage1(folder: Path | None, seed: int) -> dict | None:
    if folder is None or not (folder / f"seed-{seed}.pt").is_file():
        return None
    try:
        return torch.load(folder / f"seed-{seed}.pt", weights_only=True)
    except Exception as error:  # a truncated or foreign file: train again and overwrite it
        print(f"calplug demo: warning: ignoring unreadable stage-1 cache file "
              f"{str(folder / f'seed-{seed}.pt')!r} ({error})", file=sys.stderr)
        return None


def save_stage1(folder: Path | None, seed: int, state: dict) -> None:
    """Written to a temporary name, then renamed: an interrupted run leaves no half file."""
    if folder is None:
        return
    tmp = folder / f".seed-{seed}.pt.{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, folder / f"seed-{seed}.pt")


# -- the experiment -------------------------------------------------------------------------------
def run_experiment(proto: Protocol, *, show_progress: bool = True, cache: Path | None = None,
                   threads: int = 1, keep_models: bool = True) -> dict:
    """Every seed's stage 1 (or its cached weights) and every condition's stage 2, both methods,
    evaluated. With ``keep_models``, the first seed's stage-2 CAL state dicts are returned under
    ``"models"`` (written by ``run`` after the table is printed)."""
    from tqdm.auto import tqdm

    vocab = synthetic.Vocab()
    folder = usable_cache(cache, proto, threads)
    cached = {s: load_stage1(folder, s) for s in proto.seeds}
    total = (sum(proto.stage1_steps for s in proto.seeds if cached[s] is None)
             + len(proto.seeds) * len(proto.conditions) * len(METHODS) * proto.stage2_steps)
    say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if show_progress else (lambda msg: None)
    result = dict(protocol=_protocol_dict(proto), stage1={}, stage2={c.key: {} for c in proto.conditions},
                  stage1_cache=None if folder is None else str(folder))
    models = {}
    t0 = time.perf_counter()
    # disable=None: a bar on a terminal, none in a log file (the lines `say` writes remain).
    with tqdm(total=total, desc="calplug demo", unit="step", disable=None if show_progress else True,
              file=sys.stderr, dynamic_ncols=True, mininterval=1.0) as bar:
        for seed in proto.seeds:
            torch.manual_seed(seed)
            evalset = synthetic.make_set(proto.eval_size, seed=EVAL_STREAM + seed, noise=0.0)
            state = cached[seed]
            t = time.perf_counter()
            if state is None:
                bar.set_postfix_str(f"seed {seed} stage 1")
                state = run_stage1(seed, vocab, proto, progress=bar)
                save_stage1(folder, seed, state)
                how = f"trained ({time.perf_counter() - t:.0f} s)"
            else:
                how = f"read from the cache {folder}"
            stage1_model = build_model(seed, vocab, proto)
            stage1_model.load_state_dict(state)
            ev = evaluate(stage1_model, evalset, vocab, proto)
            result["stage1"][str(seed)] = dict(logprob=ev["logprob"], accuracy=ev["accuracy"],
                                               cached=cached[seed] is not None)
            say(f"seed {seed}: stage 1 {how}; log-prob {ev['logprob']['all']:+.3f}, "
                f"accuracy {ev['accuracy']['all']:.3f}")
            for cond in proto.conditions:
                data, batches = stage2_data(seed, cond, proto)
                found, per_image = {}, {}
                for method in METHODS:
                    bar.set_postfix_str(f"seed {seed} {cond.label} {METHOD_LABELS[method]}")
                    stats = new_weight_stats() if method == "cal" else None
                    model, losses = run_stage2(state, seed, data, batches, vocab, proto,
                                               cal=method == "cal", progress=bar, stats=stats)
                    ev = evaluate(model, evalset, vocab, proto)
                    found[method] = dict(logprob=ev["logprob"], accuracy=ev["accuracy"],
                                         final_train_loss=statistics.fmean(losses[-20:]))
                    if stats is not None:
                        found[method]["cal_weights"] = weight_summary(stats)
                    per_image[method] = ev["per_image"]
                    if keep_models and method == "cal" and seed == proto.seeds[0]:
                        models[cond.key] = copy.deepcopy(model.state_dict())
                # per-image paired differences: the evaluation's own sampling error
                found["image_differences"] = {
                    m: _moments(per_image["cal"][m] - per_image["plain"][m]) for m in METRICS}
                result["stage2"][cond.key][str(seed)] = found
                say(f"seed {seed}, {cond.label}: log-prob plain {found['plain']['logprob']['all']:+.3f}, "
                    f"CAL {found['cal']['logprob']['all']:+.3f}")
    result["seconds"] = time.perf_counter() - t0
    result["calplug_config"] = _cal_config()
    if keep_models:
        result["models"] = models
    return result


def _moments(x: torch.Tensor) -> dict:
    return dict(n=int(x.numel()), mean=float(x.mean()), sd=float(x.std()) if x.numel() > 1 else 0.0)


def _protocol_dict(proto: Protocol) -> dict:
    d = dataclasses.asdict(proto)
    d["conditions"] = [dict(key=c.key, label=c.label, noise=c.noise, kind=c.kind) for c in proto.conditions]
    d["seeds"] = list(proto.seeds)
    return d


def _cal_config() -> dict:
    from ..config import CALConfig

    return CALConfig().to_dict()


# -- verdicts and the table -----------------------------------------------------------------------
# Student's t, two-sided 95 %: t(0.975, df) for df = 1..30.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (table to 30, then the
    Cornish-Fisher expansion, within 1e-3 of the exact value)."""
    if df < 1:
        raise ValueError("t975 needs df >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def pooled_sd(groups: list[dict]) -> float:
    """The sd of the union of samples given each one's ``n``, ``mean`` and ``sd``."""
    n = sum(g["n"] for g in groups)
    if n < 2:
        return 0.0
    mean = sum(g["n"] * g["mean"] for g in groups) / n
    ss = sum((g["n"] - 1) * g["sd"] ** 2 + g["n"] * (g["mean"] - mean) ** 2 for g in groups)
    return math.sqrt(ss / (n - 1))


def verdict(diffs: list[float], image_differences: list[dict] | None = None) -> dict:
    """The paired verdict on per-seed differences CAL - plain: mean, standard error over seeds,
    margin (the larger of t(0.975, n-1) x SE and 1.96 x the evaluation standard error from the
    per-image differences) and "CAL helps" / "CAL hurts" / "no clear difference"."""
    n = len(diffs)
    d = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else 0.0
    se_eval = 0.0
    if image_differences:
        images = sum(g["n"] for g in image_differences)
        se_eval = pooled_sd(image_differences) / math.sqrt(images) if images else 0.0
    margin = max(t975(n - 1) * se if n > 1 else 0.0, 1.96 * se_eval)
    text = "CAL helps" if d > margin else "CAL hurts" if d < -margin else "no clear difference"
    return dict(verdict=text, difference=d, se=se, se_eval=se_eval, margin=margin, seeds=n)


def summarise(result: dict) -> tuple[str, list[dict]]:
    """The printed table and its rows (one per condition and metric), from results.json alone."""
    proto = result["protocol"]
    seeds = [str(s) for s in proto["seeds"]]
    rows = []
    for cond in proto["conditions"]:
        per_seed = result["stage2"][cond["key"]]
        for metric in METRICS:
            plain = [per_seed[s]["plain"][metric]["all"] for s in seeds]
            cal = [per_seed[s]["cal"][metric]["all"] for s in seeds]
            v = verdict([c - p for c, p in zip(cal, plain)],
                        [per_seed[s]["image_differences"][metric] for s in seeds])
            attrs = {}
            for a in synthetic.ATTRIBUTES:
                d = [per_seed[s]["cal"][metric][a] - per_seed[s]["plain"][metric][a] for s in seeds]
                attrs[a] = dict(difference=statistics.fmean(d),
                                se=statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else 0.0)
            rows.append(dict(condition=cond["key"], label=cond["label"], metric=metric,
                             plain=statistics.fmean(plain), cal=statistics.fmean(cal),
                             plain_se=_se(plain), cal_se=_se(cal), attributes=attrs, **v))
    n = len(seeds)
    lines = [f"calplug demo: plain vs CAL fine-tuning from the same stage-1 model, {n} seed{'s' * (n > 1)}",
             f"stage 1: {proto['stage1_steps']} plain steps on clean captions; stage 2: "
             f"{proto['stage2_steps']} steps of batch {proto['batch_size']} on fresh captions,",
             f"the given share contradicting the image; {proto['eval_size']} clean held-out images "
             "per seed; CAL-plain paired by seed"]
    for metric in METRICS:
        lines += ["", METRIC_TITLES[metric],
                  f"{'condition':<16}{'plain':>8}{'CAL':>8}{'CAL-plain':>11}{'SE':>7}  verdict"]
        for r in (r for r in rows if r["metric"] == metric):
            lines.append(f"{r['label']:<16}{r['plain']:>8.3f}{r['cal']:>8.3f}{r['difference']:>+11.3f}"
                         f"{r['se']:>7.3f}  {r['verdict']} (margin {r['margin']:.3f})")
    lines += ["", "CAL-plain per attribute, log-probability (SE)",
              f"{'condition':<16}" + "".join(f"{a:>16}" for a in synthetic.ATTRIBUTES)]
    for r in (r for r in rows if r["metric"] == "logprob"):
        lines.append(f"{r['label']:<16}" + "".join(
            f"{r['attributes'][a]['difference']:>+9.3f} ({r['attributes'][a]['se']:.3f})" for a in synthetic.ATTRIBUTES))
    s1 = [result["stage1"][s] for s in seeds]
    lines += ["", "stage-1 model (before stage 2), mean over seeds",
              "  log-prob " + _attribute_means([x["logprob"] for x in s1], "{:+.2f}"),
              "  accuracy " + _attribute_means([x["accuracy"] for x in s1], "{:.2f}")]
    lines += ["", "CAL weights in stage 2, mean over steps and seeds: gap -> clamped -> pooled weight",
              f"{'condition':<16}{'true visual words':>24}{'wrong visual words':>24}{'filler words':>24}"]
    for cond in proto["conditions"]:
        ws = [result["stage2"][cond["key"]][s]["cal"]["cal_weights"] for s in seeds]
        cells = []
        for g in WEIGHT_GROUPS:
            vals = [w["groups"][g] for w in ws if w["groups"][g]["n"]]
            cells.append("-" if not vals else "{:+.1f} -> {:.2f} -> {:.2f}".format(
                *(statistics.fmean(v[k] for v in vals) for k in ("gap", "clamped", "pooled"))))
        lines.append(f"{cond['label']:<16}" + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines), rows


def _se(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def _attribute_means(dicts: list[dict], fmt: str) -> str:
    mean = {k: statistics.fmean(d[k] for d in dicts) for k in ("all", *synthetic.ATTRIBUTES)}
    return fmt.format(mean["all"]) + " (" + ", ".join(f"{a} {fmt.format(mean[a])}" for a in synthetic.ATTRIBUTES) + ")"


def plot(result: dict, rows: list[dict], path: Path) -> None:
    """Both metrics per condition (mean and SE over seeds, each seed a dot) and the paired
    difference CAL - plain with its margin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    proto = result["protocol"]
    conds = proto["conditions"]
    seeds = [str(s) for s in proto["seeds"]]
    x = list(range(len(conds)))
    fig, axes = plt.subplots(2, 2, figsize=(9.5, 6.4), dpi=110, sharex=True)
    for col, metric in enumerate(METRICS):
        ax = axes[0, col]
        mine = [r for r in rows if r["metric"] == metric]
        for method, colour, marker, dx in (("plain", "#888888", "o", -0.06), ("cal", "#d62728", "s", 0.06)):
            ax.errorbar([i + dx for i in x], [r[method] for r in mine], yerr=[r[f"{method}_se"] for r in mine],
                        color=colour, marker=marker, capsize=3, label=METHOD_LABELS[method], linestyle="none")
            for i, c in enumerate(conds):
                ax.scatter([i + dx] * len(seeds), [result["stage2"][c["key"]][s][method][metric]["all"] for s in seeds],
                           color=colour, alpha=0.25, s=10)
        ax.set_ylabel("log p(true visual word)" if metric == "logprob" else "greedy visual-word accuracy")
        ax.set_title(METRIC_TITLES[metric].split(" (")[0], fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax = axes[1, col]
        ax.axhline(0, color="#444444", linewidth=0.8)
        ax.errorbar(x, [r["difference"] for r in mine], yerr=[r["margin"] for r in mine], color="#1f77b4",
                    marker="D", capsize=4, linestyle="none", label="mean CAL - plain, bar = margin")
        for i, c in enumerate(conds):
            per_seed = result["stage2"][c["key"]]
            ax.scatter([i] * len(seeds), [per_seed[s]["cal"][metric]["all"] - per_seed[s]["plain"][metric]["all"]
                                          for s in seeds], color="#1f77b4", alpha=0.3, s=10)
        ax.set_ylabel("CAL - plain (paired by seed)")
        ax.set_xticks(x)
        ax.set_xticklabels([c["label"].replace(" ", "\n") for c in conds], fontsize=8)
        ax.set_xlabel("stage-2 captions contradicting the image")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"calplug demo: tiny Llava, stage 2 from the same stage-1 model, {len(seeds)} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- checkpoints for `calplug inspect` ------------------------------------------------------------
def checkpoint_path(folder: Path, condition_key: str) -> Path:
    return Path(folder) / f"cal-model-noise-{condition_key}"


def save_checkpoint(model, vocab: synthetic.Vocab, path: Path) -> None:
    """``save_pretrained`` plus the word vocabulary (``calplug inspect --model PATH`` reads it)."""
    path.mkdir(parents=True, exist_ok=True)
    with quiet_transformers_bars():
        model.save_pretrained(path)
    vocab.save(path / "calplug_vocab.json")


@contextlib.contextmanager
def quiet_transformers_bars():
    """No transformers progress bar (saving, loading) in the middle of calplug's own output."""
    from transformers.utils import logging as hf_logging

    bars = getattr(hf_logging, "is_progress_bar_enabled", lambda: False)()
    if bars:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


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
    from ..errors import CALConfigError

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
    from ..errors import CALConfigError

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
    synthetic.require_extras()
    proto = protocol_from_args(args)
    if args.threads is not None and args.threads < 1:
        from ..errors import CALConfigError

        raise CALConfigError(f"--threads must be >= 1, got {args.threads}")
    threads = args.threads or 1
    torch.set_num_threads(threads)
    out = prepare_output_dir(args.out)
    cache = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    result = run_experiment(proto, show_progress=not args.no_progress, cache=cache, threads=threads,
                            keep_models=not args.no_checkpoint)
    models = result.pop("models", {})
    table, rows = summarise(result)
    result["summary"] = rows
    result["threads"] = threads
    result["versions"] = _versions()
    print(table)
    print(f"\nwall time {result['seconds']:.0f} s on {threads} thread(s)"
          + ("" if result["stage1_cache"] is None else f"; stage-1 cache {result['stage1_cache']}"))
    sys.stdout.flush()
    (out / "results.json").write_text(json.dumps(result, indent=1))
    plot(result, rows, out / "demo.png")
    written = [str(out / "results.json"), str(out / "demo.png")]
    vocab = synthetic.Vocab()
    for key, state in models.items():
        model = build_model(proto.seeds[0], vocab, proto)
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
                python=platform.python_version())
