"""What several ``calplug`` subcommands need, in one place with public names: a subcommand
imports these from here, never another subcommand's helpers.

* `prepare_output_dir`: the output folder, checked writable before minutes of work;
* `require_extras`: the optional packages the demo and `calplug inspect` draw and plot with;
* `quiet_transformers_bars`: no transformers progress bar inside calplug's own output;
* `model_class`, `load_model_and_processor`: a saved vision-language model and its processor;
* `png_data_uri`, `diverging_colour`, `collapse_runs`: the pieces of the HTML pages
  (`calplug inspect`, `calplug audit`).
"""
from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import os
import tempfile
from pathlib import Path

from ..errors import CALConfigError


def prepare_output_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """The output folder ``path``, created if missing and checked writable, before any work is
    done: a command that trains for minutes must not fail at the end for want of a folder."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise CALConfigError(f"{option} {str(folder)!r} is a file, not a folder: give a folder path "
                             "(it is created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise CALConfigError(f"{option} {str(folder)!r} cannot be written ({error.strerror}): "
                             "choose a folder you can write to") from error
    return folder


def require_extras() -> None:
    """The demo and `calplug inspect` draw with Pillow and plot with matplotlib."""
    missing = [m for m, pkg in (("PIL", "pillow"), ("matplotlib", "matplotlib"), ("numpy", "numpy"))
               if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"calplug demo / inspect need {', '.join(missing)}: "
                          'pip install "calplug[demo]"')


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


def model_class(config):
    """The transformers class that loads a model of ``config``: the image-text-to-text auto class
    when it maps the config (``AutoModelForVision2Seq`` in releases before that name), else the
    class the checkpoint names in ``architectures``."""
    import transformers

    for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
        auto = getattr(transformers, name, None)
        if auto is not None:
            try:
                auto._model_mapping[type(config)]
                return auto
            except KeyError:
                continue
    archs = getattr(config, "architectures", None) or []
    if archs and hasattr(transformers, archs[0]):
        return getattr(transformers, archs[0])
    raise CALConfigError(f"cannot tell which transformers class loads a {type(config).__name__}; "
                         "load the model yourself and use calplug's Python API")


def load_model_and_processor(path: str | os.PathLike, *, option: str = "--model", dtype=None,
                             fix: str = "build the batch yourself and call the Python API"):
    """The model and processor a folder written by ``save_pretrained`` holds (``dtype``: the
    torch dtype to load in, default the checkpoint's float32). A bad folder is a `CALConfigError`
    naming ``option`` and, as the way out, ``fix``."""
    from transformers import AutoConfig, AutoProcessor

    folder = Path(path)
    if not folder.is_dir():
        raise CALConfigError(f"{option} {str(folder)!r} is not a folder: pass a folder written by "
                             "save_pretrained (the model and its processor)")
    try:
        processor = AutoProcessor.from_pretrained(folder)
        config = AutoConfig.from_pretrained(folder)
        options = {} if dtype is None else {"dtype": dtype}
        with quiet_transformers_bars():
            try:
                model = model_class(config).from_pretrained(folder, **options)
            except TypeError:  # transformers 4.x names it torch_dtype
                model = model_class(config).from_pretrained(folder, torch_dtype=dtype)
    except (ValueError, OSError, ImportError) as error:
        raise CALConfigError(
            f"cannot load the model and its processor from {str(folder)!r} ({' '.join(str(error).split())[:300]}): "
            f"pass a folder written by save_pretrained for both, or {fix}") from error
    return model, processor


# -- pieces of the HTML pages ----------------------------------------------------------------------
def read_images(paths, command: str) -> list:
    """The images at ``paths`` as RGB pillow images; pillow missing is a `CALConfigError` naming
    ``command`` (called after the model folder is checked, so a bad folder is named first)."""
    try:
        from PIL import Image
    except ImportError as error:
        raise CALConfigError(f"{command} reads the images with pillow: pip install pillow") from error
    return [Image.open(p).convert("RGB") for p in paths]


def diverging_colour(value: float, scale: float) -> str:
    """CSS colour of a signed value: white at 0, red up to +scale, blue down to -scale."""
    x = max(-1.0, min(1.0, value / scale)) if scale > 0 else 0.0
    if x >= 0:  # white -> red
        return f"rgb(255,{round(255 - 200 * x)},{round(255 - 200 * x)})"
    return f"rgb({round(255 + 200 * x)},{round(255 + 200 * x)},255)"  # white -> blue


def png_data_uri(image, size: int = 96) -> str:
    """``image`` (PIL) as an inline PNG at most ``size`` pixels on its longer side, enlarged small
    images with nearest-neighbour pixels (the demo's 32 x 32 images stay sharp)."""
    scale = size / max(image.size)
    shape = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    buf = io.BytesIO()
    image.resize(shape, resample=0 if scale >= 1 else 1).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def collapse_runs(tokens: list[dict]) -> list[dict]:
    """Runs of an identical unsupervised token (image placeholders) shown once, with a count."""
    out = []
    for t in tokens:
        if out and not t["supervised"] and not out[-1]["supervised"] and t["text"] == out[-1]["text"]:
            out[-1]["repeat"] = out[-1].get("repeat", 1) + 1
        else:
            out.append(dict(t))
    return out


def check_writable_file(option: str, path: str) -> None:
    """``option PATH`` names a file that can be written (checked before minutes of work)."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise CALConfigError(f"{option} {path!r} is a folder: give a file path, e.g. "
                             f"{str(target / 'result.json')!r}")
    if not folder.is_dir():
        raise CALConfigError(f"{option} {path!r}: the folder {str(folder)!r} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise CALConfigError(f"{option} {path!r} cannot be written (permission denied): choose a path "
                             "you can write to")
