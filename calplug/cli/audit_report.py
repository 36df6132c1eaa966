"""What ``calplug audit`` shows: the printed summary (counts, quantiles, the ten lowest samples),
``report.html`` (the lowest-scoring samples with their images and a heat map of each token's
log-probability gain, the value the score is made of) and ``scores.png`` (a histogram of the
scores). Data in, text and files out: the command (`calplug.cli.audit`) does the scoring.
"""
from __future__ import annotations

import html
from pathlib import Path

from .common import collapse_runs, diverging_colour, png_data_uri

REASONS = {  # a record's reason -> how the summary names it
    "missing-image": "image not found", "unreadable-image": "image unreadable",
    "no-answer": "no supervised token", "too-long": "too long", "format": "not a readable sample",
    "template": "chat template", "processor": "processor", "video": "video", "refused": "refused by calplug",
    "non-finite": "non-finite scores", "no-image": "text-only",
}
SCORE_TEXT = {
    "mean": "the mean over its answer tokens of log p(token | image) - log p(token | without the image)",
    "min": "the lowest over its answer tokens of log p(token | image) - log p(token | without the image)",
}


def _lowest_tokens(rec: dict, n: int = 3) -> str:
    return ", ".join(f"{' '.join(t.get('text', str(t['token_id'])).split()) or repr(t.get('text'))} "
                     f"{t['gain']:+.2f}" for t in rec.get("lowest", [])[:n])


def quantile_name(key: str) -> str:
    return {"0": "min", "0.5": "median", "1": "max"}.get(key) or f"{float(key):.0%}"


def format_summary(summary: dict, records: list[dict], score: str) -> str:
    """The printed summary: the score, the counts, the quantiles and the lowest samples."""
    lines = [f"score of a sample: {SCORE_TEXT[score]};", "lower = the image supports the answer less", ""]
    not_scored = {k: n for k, n in summary["reasons"].items() if k != "no-image"}
    reasons = ", ".join(f"{REASONS.get(k, k)} {n}" for k, n in sorted(not_scored.items()))
    lines.append(f"{summary['samples']} samples: {summary['scored']} scored, {summary['failed']} could not be scored"
                 + (f" ({reasons})" if reasons else "")
                 + (f", {summary['text_only']} text-only (no image: not scored, kept by filters)"
                    if summary["text_only"] else ""))
    if summary["quantiles"]:
        keys = list(summary["quantiles"])
        lines.append("score quantiles " + "".join(f"{quantile_name(k):>9}" for k in keys))
        lines.append(" " * 16 + "".join(f"{summary['quantiles'][k]:>+9.3f}" for k in keys))
        lines += ["", f"the {len(summary['lowest'])} lowest:",
                  f"  {'rank':>4} {'index':>7}  {'id':<16}{'score':>8}{'tokens':>8}  lowest tokens (gain)"]
        for rank, index in enumerate(summary["lowest"], start=1):
            rec = records[index]
            ident = "-" if rec["id"] is None else str(rec["id"])
            lines.append(f"  {rank:>4} {index:>7}  {ident[:15]:<16}{rec['score']:>+8.3f}{rec['tokens']:>8}  "
                         f"{_lowest_tokens(rec)}")
    return "\n".join(lines)


def plot_histogram(scores: list[float], path: Path, title: str, threshold: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.hist(scores, bins=60, color="#4c72b0", alpha=0.85)
    ax.axvline(0.0, color="#555555", linestyle="--", linewidth=1, label="0: the image neither helps nor hurts")
    if threshold is not None:
        ax.axvline(threshold, color="#d62728", linewidth=1.2, label=f"filter: kept from {threshold:+.3f}")
    ax.set_xlabel("score: log-probability gain from the image (nats per answer token)")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
.sample { display: flex; gap: 1em; margin: 1em 0; padding: .6em; border: 1px solid #ddd; border-radius: 6px; }
.sample img.thumb { image-rendering: pixelated; border: 1px solid #999; }
.head { font-size: 95%; margin-bottom: .3em; }
.tokens { line-height: 2; }
.tok { font-family: ui-monospace, monospace; white-space: pre; padding: .1em .2em; margin: 0 1px; border-radius: 3px; border: 1px solid #eee; }
.ctx { color: #999; font-family: ui-monospace, monospace; white-space: pre; margin: 0 2px; }
table.q td, table.q th { padding: 0 .6em; text-align: right; }
.legend span { display: inline-block; padding: .1em .5em; }
"""


def render_html(rows: list[dict], summary: dict, header: str, score: str) -> str:
    """The page: the run, the counts and quantiles, the histogram, then each of ``rows`` (the
    lowest samples, lowest first: ``rank``, ``record``, ``images`` (PIL), ``tokens`` (``text``,
    ``supervised``, ``gain``, ``gap``)) with its images and its tokens coloured by gain."""
    gains = [t["gain"] for r in rows for t in r["tokens"] if t["supervised"]]
    scale = max([abs(g) for g in gains] + [1.0])
    quant = summary["quantiles"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>calplug audit</title>"
             f"<style>{CSS}</style></head><body>",
             "<h1>calplug audit</h1>", f"<p>{html.escape(header)}</p>",
             f"<p>Score of a sample: {html.escape(SCORE_TEXT[score])}. Lower means the image supports "
             "the answer less: answers that contradict the image, or that it does not help predict, "
             "score lowest.</p>",
             f"<p>{summary['samples']} samples: {summary['scored']} scored, {summary['failed']} could not "
             f"be scored, {summary['text_only']} text-only.</p>"]
    if quant:
        parts.append("<table class='q'><tr><th>score quantiles</th>" + "".join(f"<th>{quantile_name(k)}</th>" for k in quant)
                     + "</tr><tr><td></td>"
                     + "".join(f"<td>{v:+.3f}</td>" for v in quant.values()) + "</tr></table>")
    parts.append("<p><img alt='histogram of the scores' src='scores.png' style='max-width:620px'></p>")
    parts.append(f"<h2>The {len(rows)} lowest-scoring samples</h2>"
                 "<p class='legend'>Each token of the answers is coloured by its gain, log p(token | image) "
                 "- log p(token | without the image): "
                 + "".join(f"<span style='background:{diverging_colour(g, scale)}'>{g:+.1f}</span>"
                           for g in (-scale, -scale / 2, 0.0, scale / 2, scale))
                 + " (blue: the image makes the token less likely). Grey: the prompt, not scored. "
                   "Hover a token for its numbers.</p>")
    for row in rows:
        rec = row["record"]
        ident = "" if rec["id"] is None else f", id {html.escape(str(rec['id']))}"
        parts.append(f"<div class='sample' id='rank-{row['rank']}' data-index='{rec['index']}' "
                     f"data-score='{rec['score']:.6f}'><div>")
        for k, image in enumerate(row["images"]):
            parts.append(f"<img class='thumb' alt='image {k} of sample {rec['index']}' src='{png_data_uri(image, 128)}'>")
        parts.append("</div><div>")
        parts.append(f"<div class='head'><b>#{row['rank']}</b>: sample {rec['index']}{ident}: score "
                     f"<b>{rec['score']:+.3f}</b>; {rec['tokens']} answer tokens, lowest gain "
                     f"{rec['min_gain']:+.2f}, mean gap {rec['mean_gap']:+.2f}, log p {rec['log_prob']:.2f} "
                     f"with the image, {rec['log_prob_without']:.2f} without</div><div class='tokens'>")
        spans = []
        for t in collapse_runs(row["tokens"]):
            text = html.escape(t["text"].replace("\n", "\u21b5"))
            if not t["supervised"]:
                rep = f"&times;{t['repeat']}" if t.get("repeat", 1) > 1 else ""
                spans.append(f"<span class='ctx'>{text}{rep}</span>")
                continue
            spans.append(f"<span class='tok' data-gain='{t['gain']:.4f}' style='background:"
                         f"{diverging_colour(t['gain'], scale)}' title='gain {t['gain']:+.3f}, gap "
                         f"{t['gap']:+.3f}'>{text}</span>")
        parts.append("".join(spans) + "</div></div></div>")
    # Records, in the page, what the browser laid out: the coloured tokens with a visible box,
    # the images it decoded, and the first sample (tests/test_audit_report.py reads them back).
    parts.append("<script>const visible = e => { const r = e.getBoundingClientRect(); "
                 "return r.width > 0 && r.height > 0; };"
                 "document.body.dataset.renderedTokens = [...document.querySelectorAll('.tok')].filter(visible).length;"
                 "document.body.dataset.loadedImages = [...document.querySelectorAll('img.thumb')]"
                 ".filter(e => e.complete && e.naturalWidth > 0 && visible(e)).length;"
                 "const first = document.querySelector('.sample');"
                 "document.body.dataset.firstSample = first ? first.dataset.index : '';</script></body></html>")
    return "\n".join(parts)


def token_rows(record: dict, tokenizer) -> list[dict]:
    """A rescored record's tokens (``tokens=True``) as the page shows them."""
    out = []
    for tid, gain, gap in zip(record["token_ids"], record["gains"], record["gaps"]):
        out.append(dict(text=tokenizer.decode([tid]), supervised=gain is not None, gain=gain, gap=gap))
    return out
