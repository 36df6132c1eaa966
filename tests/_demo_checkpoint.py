"""A `calplug demo` checkpoint for the command tests (inspect, generate): the demo's tiny model
after a few plain training steps on synthetic captions, saved as the demo saves its models."""
from __future__ import annotations

from pathlib import Path

from calplug.cli import demo, demo_protocol, demo_training, synthetic


def build(tmp_path_factory) -> Path:
    vocab = synthetic.Vocab()
    model = demo_training.build_model(0, vocab, demo_protocol.Protocol())
    data = synthetic.make_set(64, seed=0)
    demo_training.train(model, data, demo_training.schedule(64, 12, 32, 0), vocab, lr=3e-3, warmup=1,
                        grad_clip=1.0, cal=False)
    path = tmp_path_factory.mktemp("ckpt") / "model"
    demo.save_checkpoint(model, vocab, path)
    return path
