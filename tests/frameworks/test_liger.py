"""Liger Kernel with CAL, at the patching level (tox -e axolotl: the env with triton and
liger-kernel). Liger's Triton kernels need a GPU, so nothing here runs a patched forward: these
tests apply Liger's patches to a tiny Llava on the CPU and check what they replace, which is what
calplug's composing and refusing rests on. The GPU path (a training step through Liger's kernels
with CAL) is untested unless run on a GPU (docs/frameworks.md).
"""
from __future__ import annotations

import types

import pytest

from _skips import importorskip  # noqa: E402  (skips only where the package itself is missing)

importorskip("liger_kernel", "liger-kernel", "run tox -e axolotl")

import _tiny  # noqa: E402

import calplug  # noqa: E402
from calplug.errors import CALConfigError  # noqa: E402
from calplug.frameworks import liger  # noqa: E402


@pytest.fixture()
def model(tmp_path):
    from transformers import LlavaForConditionalGeneration

    folder = _tiny.build_model_folder(tmp_path / "tiny-llava")
    return LlavaForConditionalGeneration.from_pretrained(folder).train()


def rms_norms(model) -> set[str]:
    """The forwards the decoder's RMSNorm modules run (Liger patches them in place)."""
    return {getattr(m.forward, "__func__", m.forward).__qualname__ for name, m in model.named_modules()
            if name.startswith("model.language_model") and "RMSNorm" in type(m).__name__}


def test_layer_kernels_leave_the_forward_to_calplug(model):
    """What the HF Trainer applies with ``use_liger_kernel`` and calplug's layer-only config (the
    config ms-swift's callback sets, and LLaMA-Factory's composing recipe writes): Liger's RMSNorm
    in the decoder, the model's own forward kept, so ``calplug.enable`` wraps it; the Trainer's
    check lets it through."""
    from transformers.integrations.liger import apply_liger_kernel

    assert rms_norms(model) == {"LlamaRMSNorm.forward"}
    apply_liger_kernel(model, dict(liger.LAYER_ONLY))
    assert rms_norms(model) == {"LigerRMSNorm.forward"}
    assert "forward" not in model.__dict__                      # no instance forward of Liger's
    calplug.enable(model)
    assert type(model.__dict__["forward"]).__name__ == "CALForward"
    args = types.SimpleNamespace(use_liger_kernel=True, liger_kernel_config=dict(liger.LAYER_ONLY))
    liger.check_trainer(types.SimpleNamespace(args=args))


def test_liger_defaults_replace_the_forward_which_is_why_they_are_refused(model):
    """Liger's defaults (fused_linear_cross_entropy on) set an instance ``forward`` on the model:
    applied after ``calplug.enable`` it replaces the CAL step (the Trainer applies Liger while it
    is built, before `calplug.trainer.enable_for_trainer`); calplug refuses the config."""
    from transformers.integrations.liger import apply_liger_kernel

    calplug.enable(model)
    apply_liger_kernel(model, None)
    forward = model.__dict__["forward"]
    assert type(forward).__name__ == "method" and forward.__func__.__name__ == "lce_forward"
    assert "liger_kernel" in forward.__func__.__module__
    args = types.SimpleNamespace(use_liger_kernel=True, liger_kernel_config=None)
    with pytest.raises(CALConfigError, match="Liger Kernel: CAL cannot run with use_liger_kernel=True: "
                                             "Liger's fused_linear_cross_entropy kernel is on"):
        liger.check_trainer(types.SimpleNamespace(args=args))


def test_liger_cross_entropy_replaces_torchs_for_the_whole_process():
    """Liger's ``cross_entropy`` kernel patches ``torch.nn.functional.cross_entropy`` itself, so
    calplug's weighted loss would run through it: refused."""
    import torch.nn.functional as F
    from liger_kernel.transformers import apply_liger_kernel_to_llava

    original = F.cross_entropy
    try:
        apply_liger_kernel_to_llava(cross_entropy=True, fused_linear_cross_entropy=False)
        assert F.cross_entropy is not original
        assert "liger" in F.cross_entropy.__module__
    finally:
        F.cross_entropy = original
    with pytest.raises(CALConfigError, match="Liger's cross_entropy kernel is on, and it replaces "
                                             "torch.nn.functional.cross_entropy for the whole process"):
        liger.check_kernel_config("axolotl", "x", {"fused_linear_cross_entropy": False,
                                                   "cross_entropy": True})
