"""The runs of ``calplug demo`` (protocol in `demo_protocol`, docs/demo.md): per seed, stage 1
(plain training of a tiny Llava on clean captions, or its weights from the stage-1 cache), then
per condition two stage-2 runs from those weights on the same batches, plain and with
``calplug.enable(model)``, each evaluated on the seed's clean held-out images (`demo_metrics`).
`run_experiment` returns every number as results.json records it; the verdicts and the table
are `demo_verdicts` and `demo_report`.

The stage-1 cache lives here too: the weights of each seed under the user's cache folder, in a
folder named by a hash of the stage-1 protocol and the library versions.
"""
from __future__ import annotations

import copy
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

from . import synthetic
from .demo_metrics import add_weight_stats, evaluate, new_weight_stats, weight_summary
from .demo_protocol import (EVAL_STREAM, METHOD_LABELS, METHODS, METRICS, STAGE1_STREAM, STAGE2_STREAM,
                            Condition, Protocol)


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



# -- the stage-1 cache ----------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """$CALPLUG_CACHE_DIR, else $XDG_CACHE_HOME/calplug, else ~/.cache/calplug."""
    if os.environ.get("CALPLUG_CACHE_DIR"):
        return Path(os.environ["CALPLUG_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "calplug"


def stage1_key(proto: Protocol, threads: int) -> str:
    import transformers

    # The CPU kernels torch picks (AVX2, AVX-512) round differently: a stage-1 model trained with
    # one set is not the one another machine would train, so they do not share a cache entry.
    fields = dict(proto.stage1_fields(), torch=torch.__version__, transformers=transformers.__version__,
                  threads=threads, cpu_capability=torch.backends.cpu.get_cpu_capability())
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
                   threads: int = 1, keep_models: bool = True, extra_eval=None) -> dict:
    """Every seed's stage 1 (or its cached weights) and every condition's stage 2, both methods,
    evaluated. With ``keep_models``, the first seed's stage-2 CAL state dicts are returned under
    ``"models"`` (written by ``run`` after the table is printed). ``extra_eval(model, evalset,
    vocab, proto) -> dict``, when given, is kept under each stage-2 run's ``"decoding"``."""
    from tqdm.auto import tqdm

    vocab = synthetic.Vocab()
    folder = usable_cache(cache, proto, threads)
    cached = {s: load_stage1(folder, s) for s in proto.seeds}
    total = (sum(proto.stage1_steps for s in proto.seeds if cached[s] is None)
             + len(proto.seeds) * len(proto.conditions) * len(METHODS) * proto.stage2_steps)
    say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if show_progress else (lambda msg: None)
    result = dict(protocol=proto.to_dict(), stage1={}, stage2={c.key: {} for c in proto.conditions},
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
                    if extra_eval is not None:
                        found[method]["decoding"] = extra_eval(model, evalset, vocab, proto)
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


def _cal_config() -> dict:
    from ..config import CALConfig

    return CALConfig().to_dict()
