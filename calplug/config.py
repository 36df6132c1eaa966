"""`CALConfig`: the settings of CAL, loaded from keywords, a dict, a YAML file or `$CALPLUG_CONFIG`.

Validation happens once, here, so the training hot path never meets a bad value: every error
names the offending key and gives a valid example (unknown keys get a did-you-mean). Numbers must
be finite (a NaN ``alpha`` would make every loss weight NaN) and ranges must leave CAL something
to do (``beta = 0`` makes every weight 0, so nothing would train). A YAML file's syntax errors
name the file, line and column; docs/errors.md lists every error.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import re
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
    noise_step:   forward-diffusion step of contrast="noise" (VCD's noised image), in [0, 1000);
                  VCD's default 500 gives 0.863 image + 0.505 unit noise (`calplug.noise`).
    seed:         seed of the random choices some contrasts make (patch_mask, noise).
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
    noise_step: int = 500
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
            raise CALConfigError(f"{source}: expected a mapping of settings (e.g. {{'alpha': 1.0, "
                                 f"'beta': 5.0}}), got {type(values).__name__}")
        _reject_unknown_keys(values, source)
        if source == "config":
            return cls(**dict(values))
        try:
            return cls(**dict(values))
        except CALConfigError as error:
            raise CALConfigError(f"{source}: {error}") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, *, named_by: str | None = None) -> "CALConfig":
        """Settings from a YAML file: at its top level, or in its ``cal:`` (or ``calplug:``)
        section, which is then the only part read (the file may hold other tools' sections).
        ``named_by``: where the path came from (``$CALPLUG_CONFIG``), for the error messages."""
        path = Path(path)
        where = f"calplug config file {str(path)!r}" + (f" (named by {named_by})" if named_by else "")
        fix = f": fix or unset {named_by}" if named_by else ""
        if path.is_dir():
            found = sorted(p.name for p in path.glob("*.y*ml"))[:3]
            hint = f" (it holds {', '.join(found)})" if found else ""
            raise CALConfigError(f"{where} is a folder, not a file{hint}: give the path of a YAML "
                                 f"file, e.g. {str(path / 'calplug.yaml')!r}{fix}")
        if not path.exists():
            raise CALConfigError(f"{where} does not exist{fix or ': check the path'}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise CALConfigError(f"{where} is not UTF-8 text ({error.reason} at byte {error.start}): "
                                 "save it as a UTF-8 YAML file") from None
        except OSError as error:
            raise CALConfigError(f"{where} cannot be read ({error.strerror}){fix}") from None
        data = _load_yaml(text, str(path))
        return cls.from_dict(_settings_section(data, str(path)), source=str(path))

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
        base = CALConfig.from_yaml(env_path, named_by=f"${ENV_VAR}") if env_path else CALConfig()
    elif isinstance(config, CALConfig):
        base = config
    elif isinstance(config, Mapping):
        base = CALConfig.from_dict(config)
    elif isinstance(config, (str, os.PathLike)):
        base = CALConfig.from_yaml(config)
    else:
        raise CALConfigError(
            f"config must be a CALConfig, a dict, a YAML path or None, got {type(config).__name__}: "
            "e.g. calplug.enable(model, {'alpha': 1.0, 'beta': 5.0}) or calplug.enable(model, 'cal.yaml')"
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
            if isinstance(values[key], Mapping):
                hint += (f" {key!r} holds a mapping, like a section of a YAML file: calplug reads its "
                         "settings from the top level, or from a YAML file's `cal:` section.")
            raise CALConfigError(
                f"{source}: unknown calplug setting {key!r}.{hint} Valid settings: {', '.join(known)}."
            )


# -- YAML -----------------------------------------------------------------------------------------
SECTIONS = ("cal", "calplug")


def _load_yaml(text: str, path: str) -> Any:
    """``yaml.safe_load(text)``; a syntax error or a refused tag names the file, line and column
    (PyYAML's own message says ``<unicode string>`` and counts from 0)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else path
        problem = " ".join(str(error.problem or error.context or "invalid YAML").split())
        if isinstance(error, yaml.constructor.ConstructorError) and "tag" in problem:
            tag = re.search(r"'(tag:yaml\.org,2002:)?([^']*)'", problem)
            name = f"!!{tag.group(2)}" if tag and tag.group(1) else (tag.group(2) if tag else "that tag")
            raise CALConfigError(
                f"{where}: the tag {name} is not allowed: calplug reads its config with "
                "yaml.safe_load, which builds plain numbers, strings, lists and mappings only. "
                "Remove the tag and write the value itself, e.g. `alpha: 1.0`") from None
        context = ""
        if error.context and error.problem:
            context = " ".join(str(error.context).split())
            start = error.context_mark
            if start is not None and mark is not None and start.line != mark.line:
                context += f" that starts at line {start.line + 1}, column {start.column + 1}"
            context = f" ({context})"
        raise CALConfigError(
            f"{where}: invalid YAML: {problem}{context}. Fix the file there: one `key: value` per "
            "line, e.g. `alpha: 1.0`, nested settings indented with spaces under `cal:`") from None
    except yaml.YAMLError as error:
        raise CALConfigError(f"{path}: invalid YAML: {' '.join(str(error).split())}") from None


def _settings_section(data: Any, path: str) -> Any:
    """The part of a loaded YAML file that holds calplug's settings: the whole file, or its
    ``cal:`` / ``calplug:`` section when it has one (then everything else belongs to other tools,
    and a calplug setting left at the top level is an error rather than silently unread)."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise CALConfigError(f"{path}: expected a mapping of settings, e.g. `alpha: 1.0` on one line "
                             f"and `beta: 5.0` on the next; the file holds a {type(data).__name__}")
    present = [name for name in SECTIONS if name in data]
    if len(present) > 1:
        raise CALConfigError(f"{path} has both a `cal:` and a `calplug:` section: keep one of them")
    if not present:
        sections = [key for key, value in data.items() if isinstance(value, Mapping) and key not in field_names()]
        if sections:
            raise CALConfigError(
                f"{path}: {', '.join(repr(k) for k in sections)} is a section, not a calplug setting: "
                "calplug reads its settings from the top level of the file, or from a `cal:` "
                f"(or `calplug:`) section, e.g. `cal:` then `  alpha: 1.0` on the next line. "
                f"Valid settings: {', '.join(field_names())}.")
        return data
    name = present[0]
    section = data[name]
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise CALConfigError(f"{path}: the `{name}:` section must hold calplug's settings as a "
                             f"mapping, e.g. `{name}:` then `  alpha: 1.0` on the next line; it holds "
                             f"{section!r}")
    stray = [key for key in data if key != name and key in field_names()]
    if stray:
        raise CALConfigError(
            f"{path}: {', '.join(repr(k) for k in stray)} is at the top level, but the file has a "
            f"`{name}:` section, which is all calplug reads: move it under `{name}:`")
    return section


# -- validation -----------------------------------------------------------------------------------
# A valid example per numeric setting, quoted in the error messages.
EXAMPLES = {"alpha": "alpha=1.0", "beta": "beta=5.0", "mask_ratio": "mask_ratio=0.5",
            "blur_sigma": "blur_sigma=1.0", "noise_step": "noise_step=500", "pool_window": "pool_window=3", "seed": "seed=0",
            "loss_chunk": "loss_chunk=1024"}


def _number(cfg: CALConfig, key: str) -> float:
    """The finite real number ``cfg.key``, stored back as a float (so configs compare, hash and
    print alike whether a value came as 1, 1.0 or numpy.float32(1))."""
    value = getattr(cfg, key)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = ""
        if isinstance(value, str):
            try:
                float(value)
                hint = (" (text, not a number: in YAML drop the quotes, and write an exponent with "
                        "a dot, 1.0e-3, since YAML reads 1e-3 as text)")
            except ValueError:
                pass
        raise CALConfigError(f"{key} must be a number, got {value!r}{hint}: e.g. {EXAMPLES[key]}")
    number = float(value)
    if not math.isfinite(number):
        raise CALConfigError(f"{key} must be a finite number, got {number}: NaN or inf would make the "
                             f"loss weights NaN or unbounded. e.g. {EXAMPLES[key]}")
    object.__setattr__(cfg, key, number)
    return number


def _integer(cfg: CALConfig, key: str, low: int, high: int | None, what: str) -> int:
    value = getattr(cfg, key)
    ok = not isinstance(value, bool) and isinstance(value, numbers.Integral) \
        and low <= value and (high is None or value < high)
    if not ok:
        raise CALConfigError(f"{key} must be {what}, got {value!r}: e.g. {EXAMPLES[key]}")
    object.__setattr__(cfg, key, int(value))
    return int(value)


def _choice(cfg: CALConfig, key: str, choices) -> str:
    value = getattr(cfg, key)
    if not isinstance(value, str) or value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise CALConfigError(f"{key} must be one of {tuple(choices)}, got {value!r}.{hint}")
    return value


def _validate(cfg: CALConfig) -> None:
    alpha, beta = _number(cfg, "alpha"), _number(cfg, "beta")
    if alpha < 0:
        raise CALConfigError(f"alpha must be >= 0 (a negative weight would reward errors), got {alpha}: "
                             "e.g. alpha=1.0 (the paper's clamp range is [1, 5])")
    if alpha > beta:
        raise CALConfigError(f"alpha ({alpha}) must be <= beta ({beta}): they are the clamp bounds "
                             "[alpha, beta], e.g. alpha=1.0, beta=5.0")
    if beta <= 0:
        raise CALConfigError(f"beta must be > 0, got {beta}: with alpha = beta = 0 every loss weight is 0, "
                             "so the loss is 0 and nothing trains. e.g. alpha=1.0, beta=5.0 (the paper's range)")
    window = _integer(cfg, "pool_window", 1, None, "a positive odd integer (1 = no pooling)")
    if window % 2 == 0:
        raise CALConfigError(f"pool_window must be a positive odd integer (1 = no pooling), got "
                             f"{window}: e.g. pool_window={window + 1} or pool_window={window - 1}")
    _choice(cfg, "pool_scope", POOL_SCOPES)
    ratio = _number(cfg, "mask_ratio")
    if not 0.0 <= ratio <= 1.0:
        raise CALConfigError(f"mask_ratio must be in [0, 1], got {ratio}: e.g. mask_ratio=0.5")
    if _number(cfg, "blur_sigma") <= 0:
        raise CALConfigError(f"blur_sigma must be > 0 (pixels), got {cfg.blur_sigma}: e.g. blur_sigma=1.0")
    _integer(cfg, "noise_step", 0, 1000, "an integer in [0, 1000) (diffusion steps)")
    _integer(cfg, "seed", 0, 2 ** 63, "an integer in [0, 2**63)")
    _choice(cfg, "stages", STAGES)
    _integer(cfg, "loss_chunk", 0, None, "an integer >= 0 (rows per chunk; 0 = off)")
    # The contrast is a name here; plugins may register more, so `calplug.enable` resolves it
    # (plugins.resolve_contrast) and names the registered ones when it is unknown.
    if not isinstance(cfg.contrast, str) or not cfg.contrast:
        raise CALConfigError(f"contrast must be the name of a contrast condition, got "
                             f"{cfg.contrast!r}: e.g. contrast='drop' (default) or contrast='mask'")
