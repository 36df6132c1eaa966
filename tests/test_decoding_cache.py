"""`calplug.decoding_cache`: the contrast branch's rows appended to generate()'s cache object, and
what it refuses (docs/decoding.md). On real transformers caches of the installed release, filled
through their own ``update``; the family tests (tests/test_decoding.py) check the tokens."""
from __future__ import annotations

import types

import pytest
import torch
from transformers import DynamicCache

from calplug import decoding_cache


def filled(rows: int, length: int, seed: int, layers: int = 2) -> tuple[DynamicCache, list]:
    """A DynamicCache of ``layers`` layers filled through its own update (keys and values
    ``[rows, 2, length, 4]``), and the tensors written."""
    g = torch.Generator().manual_seed(seed)
    cache, written = DynamicCache(), []
    for layer in range(layers):
        k, v = (torch.randn(rows, 2, length, 4, generator=g) for _ in range(2))
        cache.update(k, v, layer)
        written.append((k, v))
    return cache, written


def test_contrast_rows_are_appended_left_padded_and_removed_again():
    main, main_kv = filled(2, 5, seed=0)
    contrast, contrast_kv = filled(1, 3, seed=1)
    assert decoding_cache.unmergeable(main) is None
    assert decoding_cache.merge_rows(main, contrast, 2, 1) is None
    assert main.get_seq_length() == 5  # generate() still sees its own length
    # every key / value tensor of the cache: [3 rows, 2, 5, 4], the contrast row's 3 slots last
    merged = decoding_cache.tensors(main)
    assert len(merged) == 4 and all(t.shape == (3, 2, 5, 4) for t in merged)
    for (k, v), (ck, cv) in zip(main_kv, contrast_kv):
        keys = next(t for t in merged if torch.equal(t[:2], k))
        assert torch.equal(keys[2, :, 2:], ck[0]) and not bool(keys[2, :, :2].any())
    # a step writes every row; trimming leaves the main rows as they were plus the step
    main.update(torch.ones(3, 2, 1, 4), torch.ones(3, 2, 1, 4), 0)
    decoding_cache.trim_rows(main, 2, 3)
    assert all(t.shape[0] == 2 for t in decoding_cache.tensors(main))
    assert main.get_seq_length() == 6


def test_trimming_narrows_the_tensors_generate_already_handed_on():
    """transformers 4.4x's generate() returns its cache as legacy tuples of the same tensors
    before contrastive decoding leaves it: the trim narrows those tensor objects themselves."""
    main, main_kv = filled(2, 5, seed=0)
    contrast, _ = filled(1, 3, seed=1)
    assert decoding_cache.merge_rows(main, contrast, 2, 1) is None
    handed_on = list(decoding_cache.tensors(main))  # what a to_legacy_cache() tuple holds
    decoding_cache.trim_rows(main, 2, 3)
    assert [t.shape for t in handed_on] == [(2, 2, 5, 4)] * 4
    written = [t for kv in main_kv for t in kv]
    assert all(sum(torch.equal(kept, t) for t in written) == 1 for kept in handed_on)


def test_a_cache_that_does_not_fit_is_left_untouched_with_the_reason():
    main, _ = filled(2, 5, seed=0)
    before = [t.clone() for t in decoding_cache.tensors(main)]
    longer, _ = filled(1, 7, seed=1)
    assert "does not fit" in decoding_cache.merge_rows(main, longer, 2, 1)
    assert "not batch-first" in decoding_cache.merge_rows(main, filled(2, 3, seed=2)[0], 2, 1)
    assert "differ in kind" in decoding_cache.merge_rows(main, types.SimpleNamespace(), 2, 1)
    after = decoding_cache.tensors(main)
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))


def _static_cache():
    """transformers' StaticCache, whose constructor changed across releases."""
    from transformers import LlamaConfig, StaticCache

    config = LlamaConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=16)
    for kwargs in (dict(config=config, max_cache_len=8),
                   dict(config=config, max_batch_size=1, max_cache_len=8),
                   dict(config=config, batch_size=1, max_cache_len=8)):
        try:
            return StaticCache(**kwargs)
        except TypeError:
            continue
    pytest.fail("no StaticCache constructor signature of transformers 4.45 to 5.x fits")


def test_caches_indexed_by_position_or_not_plain_are_refused_naming_why():
    """Slots allocated up front are filled from position 0 in each branch, so the contrast rows
    would sit early: a static cache keeps two passes. So do legacy tuples, sink caches and
    offloaded ones."""
    assert "static cache" in decoding_cache.unmergeable(_static_cache())
    assert "tuple" in decoding_cache.unmergeable(((torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)),))
    sink = type("SinkCache", (), {})()
    assert "sink" in decoding_cache.unmergeable(sink)
    offloaded, _ = filled(1, 2, seed=0)
    offloaded.offloading = True
    assert "offloaded" in decoding_cache.unmergeable(offloaded)
    assert "no cache" in decoding_cache.unmergeable(None)
