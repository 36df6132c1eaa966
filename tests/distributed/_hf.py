"""Tiny datasets and helpers for the Trainer / SFTTrainer tests."""
from __future__ import annotations

import torch

from calplug.testing import llava_batch

LENGTHS = (12, 9, 10, 7, 11, 8, 6, 12)


def samples(model, n=8, seed=0):
    """``n`` single-sample dicts (all with an image, so the default collator can stack them),
    padded to one length, with different numbers of supervised tokens."""
    lengths = tuple(LENGTHS[i % len(LENGTHS)] for i in range(n))
    batch = llava_batch(model, seed=seed, lengths=lengths, with_image=(True,) * n)
    return [{"input_ids": batch["input_ids"][i], "attention_mask": batch["attention_mask"][i],
             "labels": batch["labels"][i], "pixel_values": batch["pixel_values"][i]} for i in range(n)]


def hf_dataset(rows):
    """A `datasets.Dataset` of the same samples, returning tensors (TRL requires a Dataset)."""
    import datasets

    ds = datasets.Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows])
    ds.set_format("torch")
    return ds


class RecordingCollator:
    """Stacks samples like `default_data_collator` and records every micro-batch it built."""

    def __init__(self):
        self.batches = []

    def __call__(self, features):
        batch = {k: torch.stack([f[k] for f in features]) for k in features[0]}
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch


def training_args(output_dir, **kw):
    """The Trainer tests' arguments: SGD, constant LR, no clipping, two micro-batches of two
    samples per optimizer step, one step, CPU, nothing saved or reported."""
    from transformers import TrainingArguments

    base = dict(output_dir=str(output_dir), per_device_train_batch_size=2,
                gradient_accumulation_steps=2, max_steps=1, learning_rate=0.1, optim="sgd",
                lr_scheduler_type="constant", max_grad_norm=0.0, report_to="none", logging_steps=1,
                save_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0,
                disable_tqdm=True, remove_unused_columns=False)
    base.update(kw)
    return TrainingArguments(**base)


class GradsAtFirstStep:
    """Trainer callback keeping the accumulated gradients of the first optimizer step."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Cb(TrainerCallback):
            grads = None

            def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
                if self.grads is None:
                    self.grads = grad_snapshot(model)

        return _Cb()


def grad_snapshot(model):
    """Every gradient, in full: an FSDP2 gradient (a DTensor shard) is gathered, which is a
    collective every rank makes (they all snapshot at the same step)."""
    def full(g):
        return g.full_tensor() if type(g).__name__ == "DTensor" else g

    return {n: full(p.grad).detach().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def tiny_tokenizer(vocab_size=256):
    """A word-level fast tokenizer over tokens "t0".."t{V-1}" (no download): TRL's SFTTrainer
    requires a processing class."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0",
                                   eos_token="t2", bos_token="t1")
