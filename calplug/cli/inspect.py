"""``calplug inspect``: what CAL does to a model's captions, token by token.

For a model and a few samples, runs one CAL training forward (no optimizer step, no gradient),
prints per token the three numbers the weight is made of -- the **gap** (how much the image raised
the token's logit), the **clamped** weight (the gap clamped to [alpha, beta]) and the **pooled**
weight (the clamped weights averaged over ``pool_window`` neighbours: the weight the loss uses) --
and then writes

* ``tokens.html``: each caption's tokens coloured by gap, clamped and pooled weight (the CAL
  paper's Figure 2a), hover for the numbers; ``tokens.png``: the first six captions as a picture;
* ``gaps.png``: a histogram of the gaps of all supervised tokens with the clamp bounds alpha and
  beta marked (the paper's Figure 4);
* ``tokens.json``: the numbers behind both.

Pooling matters for reading the weights: with the default window of 3 a token whose own gap is
below alpha still gets its neighbours' share, so a contradicted word beside grounded ones is not
at the weight floor. The printout and the page show both weights so that this is visible.

Models: a checkpoint written by ``calplug demo`` (a folder with ``calplug_vocab.json``; the samples
are then fresh synthetic images, some with contradictory captions, and each caption word is
labelled as a true visual word, a contradicted one, a filler or template word), or any model
calplug supports saved in a local folder with its processor: pass ``--image`` / ``--caption``
pairs and a ``--prompt`` that contains the processor's image placeholder.
"""
from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path

import torch

from ..errors import CALConfigError, CALInputError
from ..gap import IGNORE_INDEX
from .common import (collapse_runs, diverging_colour, load_model_and_processor, png_data_uri,
                     prepare_output_dir, quiet_transformers_bars, require_extras)


# -- gaps and weights: calplug.token_gaps ---------------------------------------------------------
def gaps_and_weights(model, batch: dict, config=None) -> dict:
    """`calplug.token_gaps` of ``batch`` (no grad, dropout off): ``gaps``, ``clamped`` (the gaps
    clamped to [alpha, beta]) and ``weights`` (the pooled weights the loss uses), each float32
    ``[B, L-1]`` with row i belonging to token i+1, and the shifted ``supervised`` mask."""
    import calplug
    from calplug.scoring import network_mode

    with network_mode(model):  # training mode, dropout off: the network itself
        found = calplug.token_gaps(model, batch, config)
    cfg = found.config
    gaps = found.gaps.float().cpu()
    return dict(gaps=gaps, clamped=gaps.clamp(cfg.alpha, cfg.beta), weights=found.weights.float().cpu(),
                supervised=found.supervised.cpu())


# -- samples --------------------------------------------------------------------------------------
def demo_samples(path: Path, n: int, noise: float, seed: int):
    """A demo checkpoint and ``n`` fresh synthetic samples (a share ``noise`` contradictory)."""
    from transformers import LlavaForConditionalGeneration

    from . import synthetic

    vocab = synthetic.Vocab.load(path / "calplug_vocab.json")
    with quiet_transformers_bars():
        model = LlavaForConditionalGeneration.from_pretrained(path)
    data = synthetic.make_set(n, seed=2_000_000 + seed, noise=noise)
    batch = synthetic.batch(data, list(range(n)), vocab)
    samples = []
    for i in range(n):
        scene = data.scenes[i]
        truth = " ".join(scene.visual()[a] for a in synthetic.ATTRIBUTES)
        samples.append(dict(image=data.images[i], tokens=vocab.decode(batch["input_ids"][i]),
                            note=("contradictory caption; " if data.corrupted[i] else "")
                            + f"image shows: {truth}",
                            corrupted=bool(data.corrupted[i]),
                            kinds=demo_word_kinds(bool(data.corrupted[i]))))
    return model, batch, samples


WORD_KINDS = {  # what each kind of caption word is, for the printed summary
    "true visual": "visual words that match the image",
    "contradicted visual": "visual words that contradict the image",
    "filler": "filler words (no image predicts them)",
    "template": "template words (a, on, the, ., it, is, and, <eos>)",
}


def demo_word_kinds(corrupted: bool) -> list:
    """The kind of every token of a demo sample (None for the unsupervised prompt)."""
    from . import synthetic

    kinds = [None] * synthetic.PROMPT_LENGTH
    visual = set(synthetic.VISUAL_SLOTS.values())
    for slot in range(synthetic.CAPTION_LENGTH):
        kinds.append(("contradicted visual" if corrupted else "true visual") if slot in visual
                     else "filler" if slot in synthetic.FILLER_SLOTS else "template")
    return kinds


def processor_samples(path: Path, images: list[str], captions: list[str], prompt: str):
    """A model saved with its processor, and image/caption pairs: the prompt is unsupervised,
    the caption supervised."""
    from PIL import Image

    if len(images) != len(captions) or not images:
        raise CALConfigError(f"give as many --caption as --image (got {len(images)} images, "
                             f"{len(captions)} captions), at least one of each")
    model, processor = load_model_and_processor(path, fix="load the model yourself and call "
                                                "calplug.cli.inspect.write_report")
    pil = [Image.open(p).convert("RGB") for p in images]
    rows = []
    for im, cap in zip(pil, captions):
        full = processor(images=im, text=prompt + cap, return_tensors="pt")
        head = processor(images=im, text=prompt, return_tensors="pt")
        ids = full["input_ids"][0]
        n_prompt = head["input_ids"].shape[1]
        if not torch.equal(ids[:n_prompt], head["input_ids"][0]):
            raise CALInputError("the tokens of the prompt alone are not a prefix of prompt + caption; "
                                "end --prompt with a space or newline")
        labels = ids.clone()
        labels[:n_prompt] = IGNORE_INDEX
        rows.append((full, labels))
    # one sample per forward: no padding conventions to get right
    batches = [dict(**{k: v for k, v in full.items()}, labels=labels[None]) for full, labels in rows]
    tok = processor.tokenizer
    samples = [dict(image=im, tokens=tok.convert_ids_to_tokens(full["input_ids"][0]), note="",
                    corrupted=False) for im, (full, _) in zip(pil, rows)]
    return model, batches, samples


# -- the report -----------------------------------------------------------------------------------
def token_rows(samples: list[dict], found: list[dict]) -> list[dict]:
    """Per sample: the tokens with, for supervised tokens, their gap, clamped weight and pooled
    weight (``weight``: what the loss uses), and their kind when the sample names it."""
    rows = []
    for sample, f in zip(samples, found):
        toks = []
        kinds = sample.get("kinds")
        for j, text in enumerate(sample["tokens"]):
            entry = dict(text=text, supervised=False)
            if j >= 1 and bool(f["supervised"][j - 1]):
                entry.update(supervised=True, gap=float(f["gaps"][j - 1]),
                             clamped=float(f["clamped"][j - 1]), weight=float(f["weights"][j - 1]))
                if kinds is not None and kinds[j] is not None:
                    entry["kind"] = kinds[j]
            toks.append(entry)
        rows.append(dict(note=sample.get("note", ""), corrupted=sample.get("corrupted", False), tokens=toks))
    return rows


def format_tokens(rows: list[dict], config, limit: int | None = None) -> str:
    """The printed report: per sample, each supervised token with its gap, clamped and pooled
    weight; then the means per kind of word (demo samples) and the gap counts."""
    lines = ["per token: gap (target logit with the image - without it); clamped: the gap clamped to "
             f"[{config.alpha:g}, {config.beta:g}];",
             f"pooled: the clamped weights averaged over a window of {config.pool_window} "
             f"({config.pool_scope}), the weight the loss uses"]
    for i, row in enumerate(rows[:limit]):
        toks = [t for t in row["tokens"] if t["supervised"]]
        lines.append("")
        lines.append(f"sample {i}" + (f": {row['note']}" if row["note"] else ""))
        for start in range(0, len(toks), 14):
            chunk = toks[start:start + 14]
            widths = [max(len(t["text"]), 5) + 1 for t in chunk]
            lines.append("  token   " + "".join(f"{t['text']:>{w}}" for t, w in zip(chunk, widths)))
            lines.append("  gap     " + "".join(f"{t['gap']:>+{w}.1f}" for t, w in zip(chunk, widths)))
            lines.append("  clamped " + "".join(f"{t['clamped']:>{w}.2f}" for t, w in zip(chunk, widths)))
            lines.append("  pooled  " + "".join(f"{t['weight']:>{w}.2f}" for t, w in zip(chunk, widths)))
    if limit is not None and len(rows) > limit:
        lines.append(f"\n({len(rows) - limit} more samples in tokens.json and tokens.html)")
    sup = [t for r in rows for t in r["tokens"] if t["supervised"]]
    kinds = [k for k in WORD_KINDS if any(t.get("kind") == k for t in sup)]
    if kinds:
        lines += ["", "mean per kind of word: gap -> clamped -> pooled weight"]
        for k in kinds:
            ts = [t for t in sup if t.get("kind") == k]
            mean = lambda key: sum(t[key] for t in ts) / len(ts)
            lines.append(f"  {WORD_KINDS[k]:<52}{mean('gap'):>+6.2f} -> {mean('clamped'):.2f} -> "
                         f"{mean('weight'):.2f}  ({len(ts)} tokens)")
    below = sum(t["gap"] <= config.alpha for t in sup)
    above = sum(t["gap"] >= config.beta for t in sup)
    lines += ["", f"{len(sup)} supervised tokens in {len(rows)} samples: gap <= alpha ({config.alpha:g}): "
              f"{below}, gap >= beta ({config.beta:g}): {above}, between: {len(sup) - below - above}"]
    return "\n".join(lines)


def _weight_colour(w: float, alpha: float, beta: float) -> str:
    x = 0.0 if beta <= alpha else max(0.0, min(1.0, (w - alpha) / (beta - alpha)))
    return f"rgb({round(255 - 120 * x)},{round(255 - 40 * x)},{round(255 - 180 * x)})"  # white -> green


CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
.sample { display: flex; gap: 1em; margin: 1em 0; padding: .6em; border: 1px solid #ddd; border-radius: 6px; }
.sample.corrupted { border-color: #d62728; }
.sample img { image-rendering: pixelated; width: 96px; height: 96px; border: 1px solid #999; }
.line { margin: .25em 0; line-height: 2; }
.label { display: inline-block; width: 4.5em; color: #666; font-size: 90%; }
.tok { font-family: ui-monospace, monospace; padding: .15em .3em; margin: 0 1px; border-radius: 3px; border: 1px solid #eee; }
.ctx { color: #999; font-family: ui-monospace, monospace; margin: 0 2px; }
.note { color: #555; font-size: 90%; }
.legend span { display: inline-block; padding: .1em .5em; }
"""


LINES = {"gap": "gap", "clamped": "clamped", "pooled": "weight"}  # line label: token field


def render_html(rows: list[dict], images: list, config, title: str) -> str:
    gaps = [t["gap"] for r in rows for t in r["tokens"] if t["supervised"]]
    scale = max([abs(g) for g in gaps] + [config.beta, 1e-6])
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             "<p>Each supervised caption token, three times: coloured by its <b>gap</b> (target logit "
             "with the image minus without it: red = the image raised it, blue = the image lowered it), "
             f"by its <b>clamped</b> weight (the gap clamped to [alpha, beta] = [{config.alpha:g}, "
             f"{config.beta:g}]) and by its <b>pooled</b> weight (the clamped weights averaged over a "
             f"window of {config.pool_window}, {html.escape(config.pool_scope)}: the weight the loss "
             "uses; white = alpha, green = beta). Pooling lends a token its neighbours' weight, so a "
             "contradicted word next to grounded ones is not at alpha. Grey text is context (prompt, "
             "image placeholders) that is not trained on. Hover a token for its numbers.</p>",
             "<p class='legend'>gap: "
             + "".join(f"<span style='background:{diverging_colour(g, scale)}'>{g:+.1f}</span>"
                       for g in (-scale, -scale / 2, 0.0, scale / 2, scale))
             + " &nbsp; weight: "
             + "".join(f"<span style='background:{_weight_colour(w, config.alpha, config.beta)}'>{w:g}</span>"
                       for w in (config.alpha, (config.alpha + config.beta) / 2, config.beta))
             + "</p>"]
    for i, (row, image) in enumerate(zip(rows, images)):
        toks = collapse_runs(row["tokens"])
        cls = "sample corrupted" if row["corrupted"] else "sample"
        parts.append(f"<div class='{cls}' id='sample-{i}'>")
        if image is not None:
            parts.append(f"<img alt='sample {i}' src='{png_data_uri(image)}'>")
        parts.append("<div>")
        for kind in LINES:
            parts.append(f"<div class='line {kind}-line'><span class='label'>{kind}</span>")
            for t in toks:
                text = html.escape(t["text"])
                if not t["supervised"]:
                    rep = f"&times;{t['repeat']}" if t.get("repeat", 1) > 1 else ""
                    parts.append(f"<span class='ctx'>{text}{rep}</span>")
                    continue
                colour = (diverging_colour(t["gap"], scale) if kind == "gap"
                          else _weight_colour(t[LINES[kind]], config.alpha, config.beta))
                parts.append(f"<span class='tok' data-gap='{t['gap']:.4f}' data-clamped='{t['clamped']:.4f}' "
                             f"data-weight='{t['weight']:.4f}' style='background:{colour}' "
                             f"title='gap {t['gap']:+.3f}, clamped {t['clamped']:.3f}, pooled "
                             f"{t['weight']:.3f}'>{text}</span>")
            parts.append("</div>")
        if row["note"]:
            parts.append(f"<div class='note'>{html.escape(row['note'])}</div>")
        parts.append("</div></div>")
    parts.append("<p><img alt='gap histogram' src='gaps.png' style='max-width:600px'></p>")
    # Records, in the page, how many coloured tokens the browser laid out with a visible box
    # (tests/test_inspect.py reads it back from a headless browser).
    parts.append("<script>document.body.dataset.renderedTokens = [...document.querySelectorAll('.tok')]"
                 ".filter(e => { const r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0; })"
                 ".length;</script></body></html>")
    return "\n".join(parts)


def plot_histogram(gaps: list[float], config, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.4), dpi=120)
    ax.hist(gaps, bins=40, color="#4c72b0", alpha=0.85)
    lo, hi = ax.get_xlim()
    ax.axvspan(min(lo, config.alpha), config.alpha, color="#999999", alpha=0.15, label=f"clamped to alpha (gap <= {config.alpha:g})")
    ax.axvspan(config.beta, max(hi, config.beta), color="#2ca02c", alpha=0.12, label=f"clamped to beta (gap >= {config.beta:g})")
    ax.axvline(config.alpha, color="#555555", linestyle="--")
    ax.axvline(config.beta, color="#2ca02c", linestyle="--")
    ax.set_xlabel("gap: target logit with image - without image")
    ax.set_ylabel("supervised tokens")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_tokens(rows: list[dict], config, path: Path, title: str, limit: int = 6) -> None:
    """A picture of the first ``limit`` captions: per token three cells -- gap (red = the image
    raised the token, blue = lowered it), clamped weight and pooled weight (white = alpha, green =
    beta) -- with the numbers written in (the printout and tokens.html as one image)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = rows[:limit]
    width = max(sum(t["supervised"] for t in r["tokens"]) for r in shown)
    fig, ax = plt.subplots(figsize=(1.0 + 0.78 * width, 0.35 + 1.15 * len(shown)), dpi=110)
    ax.set_xlim(-1.4, width)
    ax.set_ylim(len(shown) * 4.6, -0.6)
    ax.axis("off")
    scale = max([abs(t["gap"]) for r in shown for t in r["tokens"] if t["supervised"]] + [config.beta])

    def rgb(css: str):
        return tuple(int(v) / 255 for v in css[4:-1].split(","))

    for i, row in enumerate(shown):
        y0 = i * 4.6
        toks = [t for t in row["tokens"] if t["supervised"]]
        note = row["note"] or f"sample {i}"
        ax.text(-1.4, y0 - 0.1, note, fontsize=7.5, va="bottom",
                color="#d62728" if row["corrupted"] else "#333333")
        for k, t in enumerate(toks):
            ax.text(k + 0.5, y0 + 0.45, t["text"], ha="center", va="center", fontsize=7.5,
                    fontweight="bold" if t.get("kind", "").endswith("visual") else "normal",
                    color="#d62728" if t.get("kind") == "contradicted visual" else "#111111")
            cells = ((diverging_colour(t["gap"], scale), f"{t['gap']:+.1f}"),
                     (_weight_colour(t["clamped"], config.alpha, config.beta), f"{t['clamped']:.2f}"),
                     (_weight_colour(t["weight"], config.alpha, config.beta), f"{t['weight']:.2f}"))
            for line, (colour, text) in enumerate(cells):
                y = y0 + 1 + line
                ax.add_patch(plt.Rectangle((k + 0.04, y + 0.05), 0.92, 0.9, color=rgb(colour), ec="#dddddd", lw=0.5))
                ax.text(k + 0.5, y + 0.5, text, ha="center", va="center", fontsize=7)
        for line, label in enumerate(("gap", "clamped", "pooled")):
            ax.text(-0.1, y0 + 1.5 + line, label, ha="right", va="center", fontsize=7.5, color="#555555")
    ax.set_title(f"{title}: gap, clamped weight [{config.alpha:g}, {config.beta:g}], pooled weight "
                 f"(window {config.pool_window})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def compute_report(model, batches, samples: list[dict], config=None) -> dict:
    """Gaps, clamped and pooled weights for ``samples`` (``batches``: one batch dict for all, or a
    list of single-sample batches): ``rows`` (per sample and token), ``gaps``, ``config``."""
    from ..config import resolve_config

    cfg = resolve_config(config)
    found = []
    for b in (batches if isinstance(batches, list) else [batches]):
        f = gaps_and_weights(model, b, cfg)
        found += [{k: f[k][i] for k in ("gaps", "clamped", "weights", "supervised")}
                  for i in range(f["gaps"].shape[0])]
    rows = token_rows(samples, found)
    gaps = [t["gap"] for r in rows for t in r["tokens"] if t["supervised"]]
    return dict(rows=rows, gaps=gaps, config=cfg, images=[s.get("image") for s in samples])


def save_report(report: dict, out: Path, title: str = "calplug inspect") -> list[Path]:
    """``report`` (from ``compute_report``) written to ``out``: tokens.html, tokens.png, gaps.png, tokens.json."""
    cfg, rows, gaps = report["config"], report["rows"], report["gaps"]
    out.mkdir(parents=True, exist_ok=True)
    plot_histogram(gaps, cfg, out / "gaps.png", f"{title}: {len(gaps)} supervised tokens")
    plot_tokens(rows, cfg, out / "tokens.png", title)
    (out / "tokens.html").write_text(render_html(rows, report["images"], cfg, title))
    (out / "tokens.json").write_text(json.dumps(dict(config=cfg.to_dict(), samples=rows), indent=1))
    return [out / "tokens.html", out / "tokens.png", out / "gaps.png", out / "tokens.json"]


def write_report(model, batches, samples: list[dict], out: Path, config=None,
                 title: str = "calplug inspect") -> dict:
    """``compute_report`` then ``save_report``: for a model and batch you already have."""
    report = compute_report(model, batches, samples, config)
    save_report(report, Path(out), title)
    return report


# -- command line ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="folder of a `calplug demo` checkpoint (OUT/cal-model-noise-P) or a saved model with its processor")
    parser.add_argument("--out", default="calplug-inspect", help="output folder (default: ./calplug-inspect)")
    parser.add_argument("--config", default=None, help="calplug YAML config (default: $CALPLUG_CONFIG or the defaults)")
    parser.add_argument("--samples", type=int, default=8, help="demo checkpoints: how many synthetic samples (default 8)")
    parser.add_argument("--noise", type=float, default=0.25,
                        help="demo checkpoints: share of contradictory captions among the samples (default 0.25)")
    parser.add_argument("--seed", type=int, default=0, help="demo checkpoints: seed of the samples")
    parser.add_argument("--show", type=int, default=8, help="print the tokens of this many samples (default 8)")
    parser.add_argument("--image", action="append", default=[], help="other models: an image file (repeatable)")
    parser.add_argument("--caption", action="append", default=[], help="other models: its caption (repeatable)")
    parser.add_argument("--prompt", default="USER: <image>\nDescribe the image. ASSISTANT: ",
                        help="other models: the unsupervised text before each caption, with the image placeholder")


def run(args) -> int:
    require_extras()
    path = Path(args.model)
    if not path.is_dir():
        raise CALConfigError(f"--model {str(path)!r} is not a folder: pass a `calplug demo` checkpoint "
                             "(OUT/cal-model-noise-0.4) or a folder written by save_pretrained")
    if not (path / "calplug_vocab.json").is_file() and not (path / "config.json").is_file():
        raise CALConfigError(f"--model {str(path)!r} is not a model folder: it holds neither "
                             "calplug_vocab.json (a `calplug demo` checkpoint) nor config.json (a "
                             "folder written by save_pretrained). Pass OUT/cal-model-noise-0.4 of a "
                             "`calplug demo` run, or a save_pretrained folder with its processor")
    demo_checkpoint = (path / "calplug_vocab.json").is_file()
    if demo_checkpoint and (args.samples < 1 or not 0.0 <= args.noise <= 1.0):
        raise CALConfigError("--samples must be >= 1 and --noise in [0, 1]")
    if args.show < 0:
        raise CALConfigError(f"--show must be >= 0, got {args.show}")
    out = prepare_output_dir(args.out)
    if demo_checkpoint:
        model, batches, samples = demo_samples(path, args.samples, args.noise, args.seed)
    else:
        model, batches, samples = processor_samples(path, args.image, args.caption, args.prompt)
    report = compute_report(model, batches, samples, args.config)
    print(format_tokens(report["rows"], report["config"], limit=args.show))
    sys.stdout.flush()
    written = save_report(report, out, title=f"calplug inspect: {path.name}")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
