"""Test instrumentation for the framework runs (tests/frameworks/_exact.py puts this folder on
``PYTHONPATH``): Python imports ``sitecustomize`` in every process it starts, so the framework's
command and every rank its launcher starts record, when ``CALPLUG_TEST_RECORD`` names a folder:

* ``calls-rank{R}.pt``: each training call of the outermost module (the model, or the DDP /
  DeepSpeed / PEFT wrapper the trainer calls) that received ``labels``: its keyword arguments
  (tensors copied to the CPU) and the loss it returned, in call order;
* ``logs-rank{R}.jsonl``: every ``Trainer.log`` dict at full precision, after the callbacks (so
  calplug's ``cal/`` keys are in it);
* ``model-rank{R}.pt``: at the first call, where CAL is enabled (the modules holding calplug's
  state) and which parameters train; at the first optimiser step, which parameters have a
  gradient (a plain torch optimiser; DeepSpeed's flattens them).

Observers only: the framework runs unchanged. Nothing happens without ``CALPLUG_TEST_RECORD``.
With ``CALPLUG_TEST_CPU_RANKS=<framework>`` it also applies `cpu_ranks`' shim for that framework
(multi-process launches on CPUs that the framework only supports on GPUs).
"""
import os

OUT = os.environ.get("CALPLUG_TEST_RECORD")


def _install(out):
    import json

    import torch
    from torch.nn.modules import module as nn_module

    rank = os.environ.get("RANK", "0")
    calls, depth = [], [0]
    patched, names, facts = [], {}, {}

    def pre(mod, args):
        depth[0] += 1

    def post(mod, args, kwargs, output):
        depth[0] -= 1   # always_call: also when a forward raised
        if output is None or not mod.training or kwargs.get("labels") is None:
            return
        # The first training call: the outermost module (depth 0). Later ones: that module's
        # class (the depth count can drift, e.g. under gradient checkpointing's recomputation).
        if (depth[0] != 0) if not facts else (type(mod).__name__ != facts["outer"]):
            return
        loss = output.get("loss") if hasattr(output, "get") else output[0]
        calls.append({"module": type(mod).__name__,
                      "kwargs": {k: v.detach().cpu().clone() if torch.is_tensor(v) else v
                                 for k, v in kwargs.items()},
                      "loss": None if loss is None else float(loss.detach().double())})
        torch.save(calls, os.path.join(out, f"calls-rank{rank}.pt"))
        if not patched:
            _patch_trainer_log()
            names.update({id(p): n for n, p in mod.named_parameters()})
            facts.update(
                outer=type(mod).__name__,
                enabled=[n for n, m in mod.named_modules() if "_calplug_state" in m.__dict__],
                enabled_types=[type(m).__name__ for m in mod.modules() if "_calplug_state" in m.__dict__],
                trainable=[n for n, p in mod.named_parameters() if p.requires_grad],
                frozen=[n for n, p in mod.named_parameters() if not p.requires_grad])
            torch.save(facts, os.path.join(out, f"model-rank{rank}.pt"))

    def optimizer_step(optimizer, args, kwargs):
        if "grads" in facts or not names:
            return
        facts["grads"] = {names.get(id(p), f"<unnamed {tuple(p.shape)}>"): float(p.grad.norm())
                          for group in optimizer.param_groups for p in group["params"]
                          if p.grad is not None}
        torch.save(facts, os.path.join(out, f"model-rank{rank}.pt"))

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
    nn_module.register_module_forward_hook(post, with_kwargs=True, always_call=True)
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    register_optimizer_step_pre_hook(optimizer_step)


if OUT:
    os.makedirs(OUT, exist_ok=True)
    _install(OUT)
if os.environ.get("CALPLUG_TEST_CPU_RANKS"):
    from cpu_ranks import SHIMS

    SHIMS[os.environ["CALPLUG_TEST_CPU_RANKS"]]()
