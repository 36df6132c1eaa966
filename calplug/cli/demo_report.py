"""The report of ``calplug demo``: the printed table (both metrics with their verdicts, the
per-attribute differences, the stage-1 model, the CAL weights of stage 2) and demo.png. Text and
pictures only, from results.json and the rows of `demo_verdicts.paired_rows`.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from . import synthetic
from .demo_metrics import WEIGHT_GROUPS
from .demo_protocol import METHOD_LABELS, METRICS

METRIC_TITLES = {
    "logprob": "mean log-probability of the true visual word (teacher-forced, clean captions; higher is better)",
    "accuracy": "greedy visual-word accuracy (secondary)",
}


def table(result: dict, rows: list[dict]) -> str:
    """The printed table, from results.json and its rows."""
    proto = result["protocol"]
    seeds = [str(s) for s in proto["seeds"]]
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
    return "\n".join(lines)


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
