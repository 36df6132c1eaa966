"""How the tests compare a calplug result with its reference (`calplug.reference`): relative error
of whole tensors, parameter by parameter."""
from __future__ import annotations



def assert_rel_close(actual, expected, rel=1e-5, name="", atol=1e-8):
    """``||actual - expected|| <= rel * ||expected||``: relative error of a whole tensor (loss or
    gradient), the measure the issues' "to 1e-5 relative" means; elementwise checks would fail on
    gradient entries that cancel to ~0, where fp32 summation order alone moves the last digits.
    ``atol`` covers gradients that are zero in exact arithmetic (a key-projection bias)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    err = (actual - expected).norm().item()
    scale = expected.norm().item()
    assert err <= rel * scale + atol, f"{name}: relative error {err / max(scale, 1e-30):.3g} > {rel}"


def grads(model):
    """Every parameter gradient of ``model``, cloned, by name."""
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_rel_close(actual: dict, expected: dict, rel=1e-5, atol=1e-8):
    """Same parameters got gradients, and each agrees to ``rel`` (see `assert_rel_close`)."""
    assert actual.keys() == expected.keys()
    for name in expected:
        assert_rel_close(actual[name], expected[name], rel, name, atol=atol)
