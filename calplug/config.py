"""`CALConfig`: the settings of CAL, loaded from keywords, a dict, a YAML file or `$CALPLUG_CONFIG`.

Validation happens once, here, so the training hot path never meets a bad value: every error
names the offending key and says what would be valid (unknown keys get a did-you-mean).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any, Mapping

from .errors import CALConfigError

ENV_VAR = "CALPLUG_CONFIG"
POOL_SCOPES = ("flat", "sequence")
STAGES = ("both", "pretrain", "finetune")


@dataclasses.dataclass(frozen=True)
class CALConfig:
    """Settings of Contrastive ALignment.

    alpha, beta:  clamp bounds of the per-token weight (paper: [1, 5], Table 4).
    pool_window:  odd average-pooling window over the clamped weights; 1 turns pooling off (Table 10).
    pool_scope:   "flat" pools one flattened vector over the whole batch, ignored rows included and
                  across sequence boundaries (as published); "sequence" pools within each sequence
                  over supervised rows only.
    contrast:     how the "without the image" pass is built: "drop" (default, fast: image positions
                  removed, original positions kept), "mask" (as published: attention to image
                  positions masked, the full sequence recomputed), or a plugin-registered name.
    mask_ratio:   share of image positions hidden by contrast="patch_mask" (Tables 8, 9).
    blur_sigma:   Gaussian sigma, in pixels, for contrast="blur" (Table 9).
    seed:         seed of the random choices some contrasts make (patch_mask).
    stages:       training stages CAL applies to, for scripts that know theirs (Table 3):
                  "both" (default), "pretrain" (projector alignment) or "finetune" (instruction
                  tuning); see `calplug.enable_for_stage`.
    loss_chunk:   0 (default): the loss reads the logits the model produced. N > 0: the model's
                  lm_head runs on the last position only and the loss is a fused lm_head +
                  cross-entropy over N rows at a time, so no [B, L, V] logits exist in training
                  (the output's ``logits`` then hold the last position only; docs/performance.md).
    """

    alpha: float = 1.0
    beta: float = 5.0
    pool_window: int = 3
    pool_scope: str = "flat"
    contrast: str = "drop"
    mask_ratio: float = 0.5
    blur_sigma: float = 1.0
    seed: int = 0
    stages: str = "both"
    loss_chunk: int = 0

    def covers_stage(self, stage: str) -> bool:
        if stage not in STAGES[1:]:
            raise CALConfigError(f"training stage must be one of {STAGES[1:]}, got {stage!r}")
        return self.stages in ("both", stage)

    def __post_init__(self) -> None:
        _validate(self)

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> "CALConfig":
        if not isinstance(values, Mapping):
            raise CALConfigError(f"{source}: expected a mapping of settings, got {type(values).__name__}")
        _reject_unknown_keys(values, source)
        return cls(**dict(values))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "CALConfig":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise CALConfigError(f"calplug config file {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        # Allow the settings either at top level or under a `cal:` / `calplug:` section.
        for section in ("calplug", "cal"):
            if isinstance(data, Mapping) and set(data) == {section}:
                data = data[section] or {}
        return cls.from_dict(data, source=str(path))

    @classmethod
    def faithful(cls, **overrides: Any) -> "CALConfig":
        """The published algorithm, quirks included: masked contrast pass, flat pooling."""
        return resolve_config(None, contrast="mask", pool_scope="flat", **overrides)

    def replace(self, **overrides: Any) -> "CALConfig":
        _reject_unknown_keys(overrides, "override")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(CALConfig)]


def resolve_config(config: CALConfig | Mapping[str, Any] | str | os.PathLike | None = None,
                   **overrides: Any) -> CALConfig:
    """Turn whatever the user passed into a validated `CALConfig`.

    Precedence: explicit `config` (object, dict or YAML path), else the file named in
    `$CALPLUG_CONFIG`, else defaults; keyword overrides apply last.
    """
    if config is None:
        env_path = os.environ.get(ENV_VAR)
        base = CALConfig.from_yaml(env_path) if env_path else CALConfig()
    elif isinstance(config, CALConfig):
        base = config
    elif isinstance(config, Mapping):
        base = CALConfig.from_dict(config)
    elif isinstance(config, (str, os.PathLike)):
        base = CALConfig.from_yaml(config)
    else:
        raise CALConfigError(
            f"config must be a CALConfig, a dict, a YAML path or None, got {type(config).__name__}"
        )
    return base.replace(**overrides) if overrides else base


def did_you_mean(value: Any, choices) -> str:
    """`` Did you mean 'x'?`` for the closest of ``choices`` to ``value``, or ''."""
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _reject_unknown_keys(values: Mapping[str, Any], source: str) -> None:
    known = field_names()
    for key in values:
        if key not in known:
            hint = did_you_mean(key, known)
            raise CALConfigError(
                f"{source}: unknown calplug setting {key!r}.{hint} Valid settings: {', '.join(known)}."
            )


def _number(cfg: CALConfig, key: str) -> float:
    value = getattr(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CALConfigError(f"{key} must be a number, got {value!r}")
    return float(value)


def _validate(cfg: CALConfig) -> None:
    alpha, beta = _number(cfg, "alpha"), _number(cfg, "beta")
    if alpha > beta:
        raise CALConfigError(f"alpha ({alpha}) must be <= beta ({beta}): they are the clamp bounds [alpha, beta]")
    if alpha < 0:
        raise CALConfigError(f"alpha must be >= 0 (a negative weight would reward errors), got {alpha}")
    w = cfg.pool_window
    if isinstance(w, bool) or not isinstance(w, int) or w <= 0 or w % 2 == 0:
        raise CALConfigError(f"pool_window must be a positive odd integer (1 = no pooling), got {w!r}")
    if cfg.pool_scope not in POOL_SCOPES:
        raise CALConfigError(f"pool_scope must be one of {POOL_SCOPES}, got {cfg.pool_scope!r}."
                             + did_you_mean(cfg.pool_scope, POOL_SCOPES))
    ratio = _number(cfg, "mask_ratio")
    if not 0.0 <= ratio <= 1.0:
        raise CALConfigError(f"mask_ratio must be in [0, 1], got {ratio}")
    if _number(cfg, "blur_sigma") <= 0:
        raise CALConfigError(f"blur_sigma must be > 0, got {cfg.blur_sigma}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise CALConfigError(f"seed must be an integer, got {cfg.seed!r}")
    if cfg.stages not in STAGES:
        raise CALConfigError(f"stages must be one of {STAGES}, got {cfg.stages!r}."
                             + did_you_mean(cfg.stages, STAGES))
    chunk = cfg.loss_chunk
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise CALConfigError(f"loss_chunk must be an integer >= 0 (rows per chunk; 0 = off), got {chunk!r}")
    from .plugins import contrast_names  # late import: plugins may register more contrasts

    names = contrast_names()
    if cfg.contrast not in names:
        raise CALConfigError(
            f"contrast {cfg.contrast!r} is not a registered contrast condition."
            f"{did_you_mean(cfg.contrast, names)} "
            f"Registered: {', '.join(sorted(names))}."
        )
