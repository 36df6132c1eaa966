"""The protocol of ``calplug demo``, fixed before any result was seen (docs/demo.md): seeds,
stage-2 conditions, step counts and learning rates, the metrics and methods compared, and the
random streams each seed's image sets come from. Data only: the runs (`demo_training`), the
statistics (`demo_verdicts`) and the report (`demo_report`) read it from here.
"""
from __future__ import annotations

import dataclasses

METHODS = ("plain", "cal")
METHOD_LABELS = {"plain": "plain", "cal": "CAL"}
METRICS = ("logprob", "accuracy")
KINDS = ("random", "systematic", "memorised")
# Bumped when the data, the model or the stage-1 training changes in a way the protocol's
# numbers do not show: it is part of the stage-1 cache key.
STAGE1_RECIPE = 1

# Each seed's three image sets come from separate random streams (make_set seeds).
STAGE1_STREAM, STAGE2_STREAM, EVAL_STREAM = 100_000, 200_000, 1_000_000


@dataclasses.dataclass(frozen=True)
class Condition:
    """A stage-2 training set: a share ``noise`` of contradictory captions, corrupted at random
    or systematically, on fresh images (each seen once) or on a few images seen many times."""
    noise: float
    kind: str = "random"

    @property
    def key(self) -> str:
        return f"{self.noise:g}" if self.kind == "random" else f"{self.noise:g}-{self.kind}"

    @property
    def label(self) -> str:
        return f"{self.noise:.0%}" if self.kind == "random" else f"{self.noise:.0%} {self.kind}"


@dataclasses.dataclass
class Protocol:
    seeds: tuple = (0, 1, 2)
    conditions: tuple = (Condition(0.0), Condition(0.4))
    batch_size: int = 32
    stage1_steps: int = 800
    stage1_images: int = 8192
    stage1_lr: float = 2e-3
    stage1_warmup: int = 20
    stage2_steps: int = 200          # fresh images: stage2_steps x batch_size, each seen once
    stage2_lr: float = 1e-3
    stage2_warmup: int = 10
    memorised_images: int = 320      # the memorised condition: these, seen stage2_steps x batch / this times
    eval_size: int = 512
    grad_clip: float = 1.0
    hidden: int = 64
    layers: int = 2
    greedy_tokens: int = 14

    @classmethod
    def default(cls) -> "Protocol":
        return cls()

    @classmethod
    def full(cls) -> "Protocol":
        return cls(seeds=tuple(range(8)),
                   conditions=(Condition(0.0), Condition(0.2), Condition(0.4), Condition(0.6),
                               Condition(0.4, "systematic"), Condition(0.4, "memorised")))

    def stage1_fields(self) -> dict:
        """What the stage-1 weights depend on (the cache key)."""
        return dict(batch_size=self.batch_size, steps=self.stage1_steps, images=self.stage1_images,
                    lr=self.stage1_lr, warmup=self.stage1_warmup, grad_clip=self.grad_clip,
                    hidden=self.hidden, layers=self.layers, recipe=STAGE1_RECIPE)

    def to_dict(self) -> dict:
        """The protocol as results.json records it (conditions with their key and label)."""
        d = dataclasses.asdict(self)
        d["conditions"] = [dict(key=c.key, label=c.label, noise=c.noise, kind=c.kind) for c in self.conditions]
        d["seeds"] = list(self.seeds)
        return d
