"""Test instrumentation for the framework runs (tests/frameworks/_exact.py puts this folder on
``PYTHONPATH``): Python imports ``sitecustomize`` in every process it starts, so the framework's
command and every rank its launcher starts record, when ``CALPLUG_TEST_RECORD`` names a folder:

* ``calls-rank{R}.pt``: each training call of the outermost module (the model, or the DDP /
  DeepSpeed / PEFT wrapper the trainer calls) that received ``labels``: its keyword arguments
  (tensors copied to the CPU) and the loss it returned, in call order;
* ``logs-rank{R}.jsonl``: every ``Trainer.log`` dict at full precision, after the callbacks (so
  calplug's ``cal/`` keys are in it).

Observers only: the framework runs unchanged. Nothing happens without ``CALPLUG_TEST_RECORD``.
"""
import os

OUT = os.environ.get("CALPLUG_TEST_RECORD")


def _install(out):
    import json

    import torch
    from torch.nn.modules import module as nn_module

    rank = os.environ.get("RANK", "0")
    calls, depth = [], [0]
    patched = []

    def pre(mod, args):
        depth[0] += 1

    def post(mod, args, kwargs, output):
        depth[0] -= 1
        if depth[0] != 0 or not mod.training or kwargs.get("labels") is None:
            return
        loss = output.get("loss") if hasattr(output, "get") else output[0]
        calls.append({"module": type(mod).__name__,
                      "kwargs": {k: v.detach().cpu().clone() if torch.is_tensor(v) else v
                                 for k, v in kwargs.items()},
                      "loss": None if loss is None else float(loss.detach().double())})
        torch.save(calls, os.path.join(out, f"calls-rank{rank}.pt"))
        if not patched:
            _patch_trainer_log()

    def _patch_trainer_log():
        from transformers import Trainer

        original = Trainer.log
        patched.append(original)

        def log(self, logs, *args, **kwargs):
            result = original(self, logs, *args, **kwargs)
            with open(os.path.join(out, f"logs-rank{rank}.jsonl"), "a") as f:
                f.write(json.dumps({k: v for k, v in logs.items()
                                    if isinstance(v, (int, float, str))}) + "\n")
            return result

        Trainer.log = log

    nn_module.register_module_forward_pre_hook(pre)
    nn_module.register_module_forward_hook(post, with_kwargs=True)


if OUT:
    os.makedirs(OUT, exist_ok=True)
    _install(OUT)
