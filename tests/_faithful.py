"""One faithful-mode CAL step beside its reference: the shared middle of every integration's
faithful test (tests/test_llava_hf.py, test_llava_style.py, test_family_calls.py)."""
from __future__ import annotations

import calplug
from _close import grads


def faithful_step_after_reference(model, batch, ref_loss, alpha, beta, window, contrast="mask",
                                  retain_graph=False):
    """Backpropagate the reference loss and keep its gradients, then enable calplug in faithful
    mode (masked contrast pass, flat pooling) on the same model and run one training step on
    ``batch``. Returns ``(output, cal_grads, ref_grads)``; calplug stays enabled. ``contrast``:
    "drop" for decoders whose layers do not honour mask holes (mask is refused there);
    ``retain_graph``: keep the reference's graph for another setting's loss."""
    model.zero_grad()
    ref_loss.backward(retain_graph=retain_graph)
    ref_grads = grads(model)
    model.zero_grad()
    calplug.enable(model, contrast=contrast, pool_scope="flat", alpha=alpha, beta=beta,
                   pool_window=window)
    out = model(**batch)
    out.loss.backward()
    return out, grads(model), ref_grads
