"""``calplug bench --decode``: time per new token of contrastive decoding
(`calplug.contrastive_generate`, the default ``drop`` contrast) against plain ``generate()``, on
the bench's LLaVA-shaped model and a LLaVA-shaped prompt: a system prompt, 576 image tokens, a
question (docs/performance.md, docs/decoding.md). Contrastive decoding is timed twice: as it runs
(both branches in one decoder call per token where the cache allows, ``joined``) and with
``join=False`` (a second decoder call per token, the path of caches that cannot be merged).

Each variant is timed generating 1 and N new tokens (greedy, ``min_new_tokens`` so that no row
stops early); the time per new token is ``(T(N) - T(1)) / (N - 1)``, which leaves the prompt
(prefill) out, and the prefill is ``T(1)``. Repetitions are interleaved in a rotating order and
the report gives medians of wall time and of this process's CPU time (on a shared machine the CPU
time is what the other processes' load does not inflate; with one thread the two agree on an idle
machine). The ratio contrastive / plain of each is the figure; the goal is at most 1.3.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import torch

QUESTION_TOKENS = 24   # text after the image: the question and "ASSISTANT:"
GOAL = 1.3
VARIANTS = ("plain", "contrastive", "two_pass")
LABELS = {"plain": "plain generate()", "contrastive": "contrastive_generate (drop)",
          "two_pass": "  the same, join=False (two passes)"}


def decode_prompt(model, cfg) -> dict:
    """``cfg.batch`` prompts ``[text_before_image][image][question]``, sample b with 8 b fewer
    question tokens, left-padded as generate() wants."""
    g = torch.Generator().manual_seed(cfg.seed)
    image_token = model.config.image_token_index
    rows = []
    for b in range(cfg.batch):
        n_question = max(QUESTION_TOKENS - 8 * b, 2)
        text = torch.randint(3, image_token - 1, (cfg.text_before_image + n_question,), generator=g)
        k = cfg.text_before_image
        rows.append(torch.cat([text[:k], torch.full((cfg.image_tokens,), image_token), text[k:]]))
    width = max(r.numel() for r in rows)
    input_ids = torch.zeros(cfg.batch, width, dtype=torch.long)
    mask = torch.zeros(cfg.batch, width, dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, width - r.numel():], mask[b, width - r.numel():] = r, 1
    vc = model.config.vision_config
    pixels = torch.randn(cfg.batch, 3, vc.image_size, vc.image_size, generator=g)
    device, dtype = cfg.resolved_device(), cfg.resolved_dtype()
    return dict(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                pixel_values=pixels.to(device=device, dtype=dtype))


def make_runs(model, inputs: dict, new_tokens: int) -> dict[str, Callable[[], torch.Tensor]]:
    """``{variant-n: fn}`` for n in (1, new_tokens): plain generate(), contrastive_generate() and
    contrastive_generate(join=False)."""
    import calplug

    def plain(n):
        return lambda: model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=0)

    def contrastive(n, join=True):
        return lambda: calplug.contrastive_generate(model, max_new_tokens=n, min_new_tokens=n,
                                                    pad_token_id=0, join=join, **inputs)

    makers = {"plain": plain, "contrastive": contrastive,
              "two_pass": lambda n: contrastive(n, join=False)}
    return {f"{name}-{n}": makers[name](n) for name in VARIANTS for n in (1, new_tokens)}


def joined(model, inputs: dict) -> tuple[bool | None, str | None]:
    """Whether contrastive decoding joins the branches on this model and prompt, and why not."""
    import calplug

    with calplug.contrastive_decoding(model, max_new_tokens=2) as processor:
        model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0,
                       logits_processor=[processor])
    return processor.joined, processor.unjoined


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(runs: dict, device: torch.device, repeats: int, warmup: int):
    """Wall and CPU seconds of every run, rounds interleaved with the order rotating by one."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            _sync(device)
            w, c = time.perf_counter(), time.process_time()
            out = runs[name]()
            _sync(device)
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
            del out
    return wall, cpu


def per_token(times: dict, new_tokens: int) -> dict:
    """Median seconds per new token and of the prefill, per variant, from ``{variant-n: [s]}``."""
    med = {k: statistics.median(v) for k, v in times.items()}
    return {v: dict(per_token=(med[f"{v}-{new_tokens}"] - med[f"{v}-1"]) / (new_tokens - 1),
                    prefill=med[f"{v}-1"]) for v in VARIANTS}


def decode_benchmark(model, cfg, new_tokens: int = 32) -> dict:
    """The report of ``model`` (the bench's, ``cfg`` its `BenchConfig`, validated)."""
    if new_tokens < 2:
        from ..errors import CALConfigError

        raise CALConfigError(f"--new-tokens must be >= 2 (the prefill is T(1)), got {new_tokens}")
    device = cfg.resolved_device()
    model = model.eval()
    inputs = decode_prompt(model, cfg)
    runs = make_runs(model, inputs, new_tokens)
    with torch.no_grad():
        same = torch.equal(runs[f"plain-{new_tokens}"](), _alpha_zero(model, inputs, new_tokens))
        both = torch.equal(runs[f"contrastive-{new_tokens}"](), runs[f"two_pass-{new_tokens}"]())
        is_joined, why = joined(model, inputs)
    wall, cpu = time_runs(runs, device, cfg.repeats, cfg.warmup)
    w, c = per_token(wall, new_tokens), per_token(cpu, new_tokens)
    ratio_wall = w["contrastive"]["per_token"] / w["plain"]["per_token"]
    ratio_cpu = c["contrastive"]["per_token"] / c["plain"]["per_token"]
    two_pass = {"wall": w["two_pass"]["per_token"] / w["plain"]["per_token"],
                "cpu": c["two_pass"]["per_token"] / c["plain"]["per_token"]}
    return {
        "config": dataclasses.asdict(cfg), "new_tokens": new_tokens,
        "environment": _env(cfg, device),
        "prompt": {"batch": cfg.batch, "positions": int(inputs["input_ids"].shape[1]),
                   "image_tokens": cfg.image_tokens,
                   "text_tokens": [int(x) for x in (inputs["attention_mask"].sum(1) - cfg.image_tokens)]},
        "wall": wall, "cpu": cpu, "per_token_wall": w, "per_token_cpu": c,
        "ratio_wall": ratio_wall, "ratio_cpu": ratio_cpu, "ratio_two_pass": two_pass,
        "joined": is_joined, "unjoined": why, "joined_equals_two_pass": both,
        "alpha_zero_equals_generate": same,
        "goal_met": {"wall": ratio_wall <= GOAL, "cpu": ratio_cpu <= GOAL},
    }


def _alpha_zero(model, inputs: dict, n: int) -> torch.Tensor:
    import calplug

    return calplug.contrastive_generate(model, cd_alpha=0.0, max_new_tokens=n, min_new_tokens=n,
                                        pad_token_id=0, **inputs)


def _env(cfg, device) -> dict:
    import platform

    import transformers

    return {"device": str(device), "dtype": str(cfg.resolved_dtype()).replace("torch.", ""),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine()}


def format_decode_report(r: dict) -> str:
    env, cfg, p = r["environment"], r["config"], r["prompt"]
    n = r["new_tokens"]
    lines = [
        f"calplug bench --decode: device={env['device']} dtype={env['dtype']} threads={env['threads']} "
        f"torch={env['torch']} transformers={env['transformers']}",
        f"model: Llava, Llama decoder {cfg['layers']} layers x {cfg['hidden']} (ffn "
        f"{cfg['intermediate']}), vocab {cfg['vocab']}, attn={cfg['attn']}",
        f"prompt: {p['batch']} x ({cfg['text_before_image']} text + {p['image_tokens']} image + question; "
        f"text tokens {'/'.join(map(str, p['text_tokens']))}), left-padded to {p['positions']} positions; "
        f"greedy, {n} new tokens",
        f"timing: median of {cfg['repeats']} interleaved repetitions (+{cfg['warmup']} warm-up); "
        f"per new token = (T({n}) - T(1)) / {n - 1}, prefill = T(1)",
        "",
        f"{'':<34}{'per token ms':>14}{'prefill s':>11}{'per token ms':>14}{'prefill s':>11}",
        f"{'':<34}{'(wall)':>14}{'(wall)':>11}{'(cpu)':>14}{'(cpu)':>11}",
    ]
    for v in VARIANTS:
        w, c = r["per_token_wall"][v], r["per_token_cpu"][v]
        lines.append(f"{LABELS[v]:<34}{1e3 * w['per_token']:>14.2f}{w['prefill']:>11.3f}"
                     f"{1e3 * c['per_token']:>14.2f}{c['prefill']:>11.3f}")
    met = {True: "met", False: "NOT met"}
    how = ("both branches in one decoder call per token" if r["joined"]
           else f"two passes per token ({r['unjoined']})")
    lines += [
        "",
        f"contrastive / plain per new token: {r['ratio_wall']:.2f}x wall, {r['ratio_cpu']:.2f}x cpu "
        f"(goal <= {GOAL}x: {met[r['goal_met']['wall']]} wall, {met[r['goal_met']['cpu']]} cpu); "
        f"{how}",
        f"join=False / plain per new token: {r['ratio_two_pass']['wall']:.2f}x wall, "
        f"{r['ratio_two_pass']['cpu']:.2f}x cpu",
        f"cd_alpha=0 gives generate()'s tokens on this prompt: {r['alpha_zero_equals_generate']}; "
        f"joined and join=False give the same tokens: {r['joined_equals_two_pass']}",
    ]
    return "\n".join(lines)


def run(args, cfg, model) -> int:
    """``calplug bench --decode``: the decode benchmark of ``model``, printed (and ``--json``)."""
    import json

    from ..errors import CALConfigError

    if args.new_tokens < 2:
        raise CALConfigError(f"--new-tokens must be >= 2 (the prefill is T(1)), got {args.new_tokens}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    result = decode_benchmark(model, cfg, args.new_tokens)
    print(format_decode_report(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if args.check and not all(result["goal_met"].values()) else 0
