"""What several ``calplug`` subcommands need, in one place with public names: a subcommand
imports these from here, never another subcommand's helpers.

* `prepare_output_dir`: the output folder, checked writable before minutes of work;
* `require_extras`: the optional packages the demo and `calplug inspect` draw and plot with;
* `quiet_transformers_bars`: no transformers progress bar inside calplug's own output;
* `model_class`: which transformers class loads a saved vision-language model;
* `load_saved`, `process_images`, `forward_arguments`: a model saved with its processor, and the
  processor's tensors for images and texts as the model's forward takes them (verify, generate).
"""
from __future__ import annotations

import contextlib
import importlib.util
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
                         "load the model yourself and call calplug.cli.inspect.write_report")


def load_saved(path: Path, fallback: str):
    """``(model, processor)`` from a folder written by ``save_pretrained`` for both; an error
    naming the folder and ``fallback`` (what to do instead) when they do not load."""
    from transformers import AutoConfig, AutoProcessor

    if not path.is_dir():
        raise CALConfigError(f"--model {str(path)!r} is not a folder: pass a folder written by "
                             "save_pretrained (the model and its processor)")
    try:
        processor = AutoProcessor.from_pretrained(path)
        model = model_class(AutoConfig.from_pretrained(path)).from_pretrained(path)
    except (ValueError, OSError, ImportError) as error:
        raise CALConfigError(
            f"cannot load the model and its processor from {str(path)!r} ({' '.join(str(error).split())[:300]}): "
            f"pass a folder written by save_pretrained for both, or {fallback}") from error
    return model, processor


def forward_arguments(model, batch: dict) -> dict:
    """The entries of a processor's output that the model's forward takes: some processors return
    more than a given release's forward accepts (the Llava processor's ``token_type_ids`` on
    transformers 4.45), and a forward without ``**kwargs`` raises on them."""
    import inspect

    parameters = inspect.signature(model.forward).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return batch
    return {k: v for k, v in batch.items() if k in parameters}


def process_images(processor, images: list, texts: list[str], **options) -> dict:
    """The processor's tensors for ``texts`` with one image each (flat image list, or one list
    per text for processors that want that)."""
    try:
        return processor(images=images, text=texts, return_tensors="pt", **options)
    except (ValueError, TypeError):
        return processor(images=[[im] for im in images], text=texts, return_tensors="pt", **options)
