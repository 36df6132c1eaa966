"""The paired statistics of ``calplug demo``: per condition and metric, the difference CAL - plain
of each seed (both methods trained from the same stage-1 weights on the same batches), its mean,
its standard error over seeds, a margin, and the verdict "CAL helps" / "CAL hurts" / "no clear
difference" (docs/demo.md, "Verdict"). Computed from results.json alone.
"""
from __future__ import annotations

import math
import statistics

from . import synthetic
from .demo_protocol import METRICS


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



def paired_rows(result: dict) -> list[dict]:
    """The table's rows, one per condition and metric: both methods' means and standard errors
    over seeds, the paired difference with its verdict (`verdict`), and per attribute the mean
    paired difference and its standard error."""
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
    return rows


def _se(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
