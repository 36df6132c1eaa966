"""One cache for both branches of contrastive decoding: the contrast branch's rows appended to the
cache object ``generate()`` holds, so that each later step runs the decoder once on ``B + B'``
rows (`calplug.decoding_branch`).

Why a merge, and why it is exact. The main branch's prefill fills ``generate()``'s cache with
``B`` rows of length ``L``; the contrast branch's prefill fills a fresh cache of the same kind with
``B'`` rows of length ``n' <= L`` (``drop`` leaves the image out), each row ending at its last
token (right-aligned, padding first). Appending those rows, each tensor left-padded with zeros to
the main rows' length, puts every contrast row in the main rows' frame: slot ``j`` is cache
position ``j`` for all rows, a contrast row's own tokens sit in its last ``n'`` slots and its
padding mask (zeros over the added slots) hides the rest, exactly as ``generate()`` hides a
left-padded row's padding. A sliding window then drops the same slots from every row (it counts
back from the newest one), and per-row states with no sequence axis (convolution and linear-
attention states) are the row's state after its last token, which is what the next token needs.
``generate()`` keeps reading the cache's length, which the merge leaves as it was.

No model knowledge: the cache object is walked as plain data (attributes, lists, dicts) and
every tensor in it is taken as batch-first. What is not merged, and why (the caller then keeps the
two-pass path, `merge_rows` returning the reason):

* a cache with slots allocated up front and indexed by cache position (a ``max_cache_len``:
  transformers' static, hybrid and sliding-window static caches): each branch fills them from
  position 0, so the contrast rows would sit ``L - n'`` slots early;
* a legacy tuple cache, whose tuples cannot be grown in place;
* caches that evict their first tokens or hold quantized / offloaded tensors (`NOT_MERGED`);
* any tensor whose first axis is not the batch, or whose other axes differ by more than one
  shorter axis.
"""
from __future__ import annotations

import torch

from .classes import is_named

# Caches whose tensors are not plain per-row key / value / state tensors: a sink cache keeps each
# row's first tokens (a padded contrast row's padding), quantized and offloaded caches hold
# tensors in another form or place.
NOT_MERGED = ("SinkCache", "QuantizedCache", "OffloadedCache", "OffloadedStaticCache",
              "OffloadedHybridCache")
_DEPTH = 6


def _children(obj) -> list[tuple[object, object]]:
    """``(key, value)`` of the containers and attributes the walk descends into."""
    if isinstance(obj, list):
        return list(enumerate(obj))
    if isinstance(obj, dict):
        return list(obj.items())
    if hasattr(obj, "__dict__") and not isinstance(obj, type):  # transformers < 4.50: Cache is a Module
        return list(vars(obj).items())
    return []


def _get(obj, key):
    return obj[key] if isinstance(obj, (list, dict)) else getattr(obj, key)


def _set(obj, key, value) -> None:
    if isinstance(obj, (list, dict)):
        obj[key] = value
    else:
        setattr(obj, key, value)


def _walk(obj, depth: int = 0, seen: set | None = None):
    """Every ``(holder, key, tensor)`` reachable from ``obj`` (tensors found once)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > _DEPTH:
        return
    seen.add(id(obj))
    for key, value in _children(obj):
        if isinstance(value, torch.Tensor):
            yield obj, key, value
        elif isinstance(value, (list, dict)) or hasattr(value, "__dict__"):
            yield from _walk(value, depth + 1, seen)


def _static(obj, depth: int = 0, seen: set | None = None) -> bool:
    """Whether ``obj`` or anything it holds has a ``max_cache_len``: slots allocated up front and
    indexed by cache position (transformers' static, hybrid and sliding-window static caches and
    layers, 4.45 to 5.x)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > _DEPTH or isinstance(obj, (torch.Tensor, type)):
        return False
    seen.add(id(obj))
    if getattr(obj, "max_cache_len", None) is not None:
        return True
    return any(_static(v, depth + 1, seen) for _, v in _children(obj))


def unmergeable(cache) -> str | None:
    """Why ``cache`` (after the main prefill) cannot take the contrast rows; None when it can."""
    if cache is None:
        return "the model kept no cache object"
    if isinstance(cache, tuple):
        return "a legacy tuple cache cannot be grown in place"
    if is_named(cache, NOT_MERGED) or getattr(cache, "offloading", False) is True:
        return f"{type(cache).__name__} is a sink, quantized or offloaded cache"
    if _static(cache):
        return f"{type(cache).__name__} allocates its slots up front, indexed by cache position (a static cache)"
    return None


def merge_rows(main, contrast, rows: int, contrast_rows: int) -> str | None:
    """Append ``contrast``'s rows to ``main`` in place (``main`` then holds ``rows +
    contrast_rows`` rows), each contrast tensor left-padded with zeros along the one axis where
    it is shorter. Checks every pair first and changes nothing when one does not fit: returns the
    reason then, None after merging."""
    if type(main) is not type(contrast):
        return f"the branches' caches differ in kind ({type(main).__name__}, {type(contrast).__name__})"
    pairs = []
    reason = _pair(main, contrast, rows, contrast_rows, pairs, 0, set())
    if reason is not None:
        return reason
    if not pairs:
        return f"{type(main).__name__} holds no tensor"
    for holder, key, a, b in pairs:
        _set(holder, key, torch.cat([a, _left_padded(b, a)], 0))
    return None


def _pair(a, b, rows, contrast_rows, pairs, depth, seen) -> str | None:
    if id(a) in seen or depth > _DEPTH:
        return None
    seen.add(id(a))
    ka, kb = _children(a), _children(b)
    if [k for k, _ in ka] != [k for k, _ in kb]:
        return f"the branches' {type(a).__name__} objects hold different entries"
    for (key, x), (_, y) in zip(ka, kb):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            reason = _tensor_pair(key, x, y, rows, contrast_rows)
            if reason is not None:
                return reason
            if x.dim() > 0 and x.numel() > 0:
                pairs.append((a, key, x, y))
        elif isinstance(x, tuple) and any(isinstance(v, torch.Tensor) for v in x):
            return f"{type(a).__name__}.{key} is a tuple of tensors"
        elif isinstance(x, (list, dict)) or (hasattr(x, "__dict__") and not isinstance(x, type)):
            if type(x) is not type(y):
                return f"the branches' {key!r} entries differ in kind"
            reason = _pair(x, y, rows, contrast_rows, pairs, depth + 1, seen)
            if reason is not None:
                return reason
    return None


def _tensor_pair(key, x, y, rows, contrast_rows) -> str | None:
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        return f"{key!r} is a tensor in one branch's cache only"
    if x.dim() == 0 or (x.numel() == 0 and y.numel() == 0):  # a scalar setting, an unused slot
        return None if x.dim() == y.dim() else f"{key!r}: {tuple(x.shape)} against {tuple(y.shape)}"
    if x.dim() != y.dim() or x.shape[0] != rows or y.shape[0] != contrast_rows:
        return (f"{key!r} is not batch-first ({tuple(x.shape)} for {rows} main rows, "
                f"{tuple(y.shape)} for {contrast_rows} contrast rows)")
    differ = [d for d in range(1, x.dim()) if x.shape[d] != y.shape[d]]
    if len(differ) > 1 or (differ and y.shape[differ[0]] > x.shape[differ[0]]):
        return f"{key!r}: contrast {tuple(y.shape)} does not fit main {tuple(x.shape)}"
    return None


def _left_padded(b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    b = b.to(device=like.device, dtype=like.dtype)
    for d in range(1, like.dim()):
        missing = like.shape[d] - b.shape[d]
        if missing:
            shape = list(b.shape)
            shape[d] = missing
            return torch.cat([b.new_zeros(shape), b], d)
    return b


def tensors(cache) -> list[torch.Tensor]:
    """Every tensor a cache object holds, in the order of its attributes."""
    if isinstance(cache, tuple):
        return [t for item in cache for t in (item if isinstance(item, tuple) else (item,))]
    return [t for _, _, t in _walk(cache)]


def trim_rows(cache, rows: int, total: int) -> None:
    """Drop the appended rows again: every tensor of ``total`` rows keeps its first ``rows``
    (``generate()``'s cache as it would be without the contrast branch). In place, the tensor
    objects themselves narrowed: ``generate()`` may already have handed them on (transformers
    4.4x returns the cache converted to legacy tuples of the same tensors)."""
    if cache is None or isinstance(cache, tuple) or rows == total:
        return
    for holder, key, t in list(_walk(cache)):
        if t.dim() > 0 and t.shape[0] == total:
            try:
                with torch.no_grad():
                    t.set_(t.untyped_storage(), t.storage_offset(), (rows,) + tuple(t.shape[1:]), t.stride())
            except RuntimeError:  # a tensor that cannot be changed in place: replace it in its holder
                _set(holder, key, t[:rows])
