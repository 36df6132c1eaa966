"""What the framework tests share: running a framework's own command, and reading the training
logs it prints (transformers prints one dict per logging step)."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))  # _tiny
# In this process too (axolotl's config loading runs in-process): offline, no telemetry. axolotl
# sends usage events unless told not to, and without a network its sender retries for minutes.
OFFLINE = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               WANDB_MODE="disabled", AXOLOTL_DO_NOT_TRACK="1", DO_NOT_TRACK="1")
for _key, _value in OFFLINE.items():
    os.environ.setdefault(_key, _value)

BIN = Path(sys.executable).parent
LOG_DICT = re.compile(r"\{'loss': [^{}]*\}")


def framework_env(**extra) -> dict:
    """The environment of a framework run: offline, CPU only, quiet telemetry."""
    env = dict(os.environ)
    env.update(OFFLINE, CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), USE_HF="1",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("CALPLUG_CONFIG", None)
    env.update(extra)
    return env


def run(cmd: list[str], cwd, timeout: int = 900, **env) -> subprocess.CompletedProcess:
    """Run ``cmd`` (stdout and stderr together in ``.stdout``); the output is kept in
    ``cwd/<name>.log`` for a failing test to point at."""
    result = subprocess.run(cmd, cwd=cwd, env=framework_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return result


def step_logs(output: str) -> list[dict[str, float]]:
    """The per-step training logs transformers printed (``{'loss': ..., ...}``), as floats."""
    logs = []
    for match in LOG_DICT.finditer(output):
        values = ast.literal_eval(match.group(0))
        logs.append({k: float(v) for k, v in values.items() if _number(v)})
    return logs


def _number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def tail(output: str, lines: int = 60) -> str:
    return "\n".join(output.splitlines()[-lines:])


def assert_cal_was_active(cal_logs: list[dict], plain_logs: list[dict], steps: int) -> None:
    """calplug's keys in every step's log, weights not the plain 1 (alpha 0: weights are the
    clamped gaps), every supervised token of these image samples contrasted, and the first
    step's loss (same seed, same batch) not the plain one."""
    assert len(cal_logs) == steps and len(plain_logs) == steps, (cal_logs, plain_logs)
    for log in cal_logs:
        for key in ("cal/mean_weight", "cal/share_alpha", "cal/share_beta", "cal/mean_gap",
                    "cal/share_contrasted", "cal/tokens"):
            assert key in log, (key, log)
        assert log["cal/tokens"] > 0
        assert 0.0 <= log["cal/mean_weight"] < 0.5, log   # not 1: CAL's weights reached the loss
        assert log["cal/share_contrasted"] == 1.0, log
    for log in plain_logs:
        assert not any(k.startswith("cal/") for k in log), log
    assert cal_logs[0]["loss"] != plain_logs[0]["loss"], (cal_logs[0], plain_logs[0])
