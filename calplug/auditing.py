"""`calplug.audit`: which training samples does the image support? The contrast CAL weights
tokens by, computed once over a dataset with the model about to be fine-tuned, ranks the samples
whose answers the image contradicts or does not help predict.

Per supervised answer token ``t`` of a sample (docs/audit.md):

    gain_t = log p(y_t | image, y_<t) - log p(y_t | without the image, y_<t)

both sides from `calplug.token_gaps(..., log_probs=True)`: the training step's own main pass and
image-blind contrast pass (``contrast="drop"`` by default), in training mode with dropout off,
without grad. A sample's ``score`` is the mean gain over its answer tokens (``score="mean"``) or
its lowest token's gain (``score="min"``): lower means the image supports the answer less. The
raw logit gap CAL clamps is recorded too (``mean_gap``, ``min_gap``), but not used to rank: a
token whose logits all rise with the image has a high gap and no gain, so gaps are not comparable
across tokens.

* `audit_batch(model, batch)`: one collated training batch -> one record per sample.
* `audit(model, data, processor=...)`: a data file (LLaVA / ShareGPT JSON or JSON Lines, read by
  `calplug.data_files`), its records, or any iterable of collated batches (a DataLoader) -> the
  records, in input order, with ``index`` and the sample's ``id``. A sample that cannot be scored
  (image missing or unreadable, no supervised token, too long) gets ``score: None``, a ``reason``
  and an ``error``; the others go on.
* `select` (the filters of ``calplug audit --keep-top / --drop-bottom / --min-score``) and
  `summarize` (counts, quantiles, the lowest samples) read the records.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Iterator

import torch

from . import data_files, processing
from .errors import CALConfigError, CALInputError, CALSampleError
from .scoring import network_mode, token_gaps

SCORES = {"mean": "mean_gain", "min": "min_gain"}   # score= -> the statistic the score is


# -- one batch ------------------------------------------------------------------------------------
@torch.no_grad()
def audit_batch(model, batch: dict, config=None, *, score: str = "mean", lowest: int = 3,
                tokens: bool = False, **overrides) -> list[dict]:
    """One record per sample of a collated training batch (the forward's keyword arguments,
    ``labels`` marking the answer tokens): ``score`` and the statistics it is built from
    (``tokens``, ``mean_gain``, ``min_gain``, ``mean_gap``, ``min_gap``, ``log_prob`` and
    ``log_prob_without``: mean log-probability of the answer tokens with and without the image,
    ``weight``: CAL's mean loss weight), the ``lowest`` answer tokens (``position`` among the
    sample's answer tokens, ``token_id``, ``gain``, ``gap``) and ``error`` None. A sample the image
    does not reach, or with no supervised token after the image, gets ``score`` None, a
    ``reason`` and an ``error``. ``tokens=True`` adds every token of the sample (``token_ids``)
    with its ``gains`` / ``gaps`` (None where not scored), for heat maps. ``config`` /
    ``overrides`` as `calplug.token_gaps` takes them (``contrast="mask"``, ...)."""
    if score not in SCORES:
        raise CALConfigError(f"score must be one of {sorted(SCORES)} (the mean or the lowest answer-token "
                             f"gain), got {score!r}")
    with network_mode(model):
        found = token_gaps(model, batch, config, log_probs=True, **overrides)
    rows = found.supervised & found.contrasted
    gain, gap = found.log_prob_gain.float().cpu(), found.gaps.float().cpu()
    with_p, without_p = found.log_prob_with.float().cpu(), found.log_prob_without.float().cpu()
    weights, labels, rows = found.weights.float().cpu(), found.labels.cpu(), rows.cpu()
    ids = batch.get("input_ids")
    mask = batch.get("attention_mask")
    records = []
    for b in range(rows.shape[0]):
        r = rows[b].nonzero().squeeze(1)
        if not bool(found.with_image[b]):
            records.append(failed("no-image", "no image reaches this sample, so the image cannot support its answer"))
            continue
        if r.numel() == 0:
            records.append(failed("no-answer", "no supervised token after the image: nothing to score"))
            continue
        g = gain[b, r]
        if not bool(torch.isfinite(g).all()):
            records.append(failed("non-finite", "non-finite log-probabilities (overflowing logits: try float32)"))
            continue
        x = gap[b, r]
        order = torch.argsort(g, stable=True)[:lowest]
        rec = dict(score=None, tokens=int(r.numel()), mean_gain=float(g.mean()), min_gain=float(g.min()),
                   mean_gap=float(x.mean()), min_gap=float(x.min()), log_prob=float(with_p[b, r].mean()),
                   log_prob_without=float(without_p[b, r].mean()), weight=float(weights[b, r].mean()),
                   lowest=[dict(position=int(k), token_id=int(labels[b, r[k]]), gain=float(g[k]),
                                gap=float(x[k])) for k in order.tolist()],
                   error=None)
        rec["score"] = rec[SCORES[score]]
        if tokens and ids is not None and ids.shape[1] == rows.shape[1] + 1:
            rec.update(_token_view(ids[b].cpu(), None if mask is None else mask[b].cpu(),
                                   rows[b], gain[b], gap[b]))
        records.append(rec)
    return records


def failed(reason: str, message: str) -> dict:
    """The record of a sample that could not be scored."""
    return dict(score=None, reason=reason, error=message)


def _token_view(ids: torch.Tensor, mask, rows: torch.Tensor, gain: torch.Tensor, gap: torch.Tensor) -> dict:
    """Every real (unpadded) token of a sample with the gain and gap of the row that predicts it."""
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    out = dict(token_ids=[], gains=[], gaps=[])
    for p in keep.nonzero().squeeze(1).tolist():
        scored = p >= 1 and bool(rows[p - 1])
        out["token_ids"].append(int(ids[p]))
        out["gains"].append(float(gain[p - 1]) if scored else None)
        out["gaps"].append(float(gap[p - 1]) if scored else None)
    return out


# -- a dataset ------------------------------------------------------------------------------------
def audit(model, data, *, processor=None, batch_size: int = 8, config=None, score: str = "mean",
          image_folder=None, max_length: int | None = None, lowest: int = 3, start: int = 0,
          indices: Iterable[int] | None = None, tokens: bool = False, **overrides) -> Iterator[dict]:
    """The audit's records, one per sample in input order (``index``: 0-based position, ``id``:
    the sample's own id or None), of

    * a data file path (LLaVA JSON, ShareGPT-style ``messages`` + ``images``, JSON Lines of
      either) or a list of such records: formatted with ``processor``'s chat template, every
      assistant turn supervised (`calplug.processing`); images read from ``image_folder`` (default:
      the data file's folder, or the working folder for records);
    * any iterable of collated training batches (a ``DataLoader``): scored as they come.

    ``start`` skips the first samples (resuming a run); ``indices`` scores only those records
    (a file or records). ``batch_size`` samples are scored together. ``max_length`` refuses longer
    samples (default: none). Other arguments as `audit_batch`."""
    scoring = dict(config=config, score=score, lowest=lowest, tokens=tokens, **overrides)
    if isinstance(data, (str, Path)):
        loaded = data_files.read(data)
        records, root = loaded.records, Path(image_folder) if image_folder else loaded.path.parent
    else:
        data = iter(data)
        first = next(data, None)
        if first is None:
            return
        if isinstance(first, dict) and isinstance(first.get("input_ids"), torch.Tensor):
            yield from _audit_batches(model, _chain(first, data), start, scoring)
            return
        records, root = [first, *data], Path(image_folder) if image_folder else Path.cwd()
    if processor is None:
        raise CALConfigError("auditing a data file or its records needs the model's processor "
                             "(processor=AutoProcessor.from_pretrained(...)): its chat template "
                             "formats the conversations")
    if processing.chat_template(processor) is None:
        raise CALConfigError("the processor has no chat template, so the prompt side cannot be "
                             "formatted as training formats it: save the processor with its chat "
                             "template (processor.chat_template = ...; save_pretrained)")
    if batch_size < 1:
        raise CALConfigError(f"batch_size must be >= 1, got {batch_size}")
    chosen = range(start, len(records)) if indices is None else sorted(indices)
    pairs = ((i, records[i]) for i in chosen)
    yield from _audit_records(model, processor, pairs, root, batch_size, max_length, scoring)


def _chain(first, rest):
    yield first
    yield from rest


def _audit_batches(model, batches, start: int, scoring: dict) -> Iterator[dict]:
    index = 0
    for batch in batches:
        size = batch["input_ids"].shape[0]
        if index + size <= start:
            index += size
            continue
        for rec in audit_batch(model, to_model(batch, model), **scoring):
            if index >= start:
                yield dict(index=index, id=None, **rec)
            index += 1


def _audit_records(model, processor, pairs, root: Path, batch_size: int, max_length, scoring) -> Iterator[dict]:
    chunk = []
    for pair in pairs:
        chunk.append(pair)
        if len(chunk) == batch_size:
            yield from _score_chunk(model, processor, chunk, root, max_length, scoring)
            chunk = []
    if chunk:
        yield from _score_chunk(model, processor, chunk, root, max_length, scoring)


def _score_chunk(model, processor, chunk: list, root: Path, max_length, scoring: dict) -> list[dict]:
    """Records of ``chunk`` ((index, record) pairs) in order: each prepared alone (its problems
    are its own), the prepared ones scored as one batch."""
    done, ready = {}, []
    for index, record in chunk:
        ident = record.get("id") if isinstance(record, dict) else None
        ident = ident if isinstance(ident, (str, int)) else None
        try:
            conv = data_files.conversation(record)
            if not conv.images:
                raise CALSampleError("no-image", "text-only sample: it has no image to support its answer")
            images = data_files.load_images(conv.images, root)
            encoded = processing.encode_conversation(processor, conv.messages, images, max_length=max_length)
            ready.append((index, ident, processing.forward_arguments(model, encoded)))
        except CALSampleError as error:
            done[index] = dict(index=index, id=ident, **failed(error.reason, str(error)))
    tokenizer = getattr(processor, "tokenizer", processor)
    for (index, ident, _), rec in zip(ready, _score_encoded(model, [e for *_, e in ready], tokenizer, scoring)):
        for low in rec.get("lowest", []):
            low["text"] = tokenizer.decode([low["token_id"]])
        done[index] = dict(index=index, id=ident, **rec)
    return [done[index] for index, _ in chunk]


def _score_encoded(model, encoded: list[dict], tokenizer, scoring: dict) -> list[dict]:
    """Scores of encoded samples: as one batch; one at a time when they cannot be batched or the
    batch is refused (then a refused sample is that sample's error, not the run's)."""
    if not encoded:
        return []
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    try:
        return audit_batch(model, to_model(processing.collate(encoded, pad), model), **scoring)
    except CALInputError as error:
        if len(encoded) == 1:
            return [failed("refused", f"calplug cannot score this sample: {' '.join(str(error).split())}")]
    return [rec for e in encoded for rec in _score_encoded(model, [e], tokenizer, scoring)]


def to_model(batch: dict, model) -> dict:
    """``batch`` on the model's device, floating tensors (pixels) in the model's dtype."""
    param = next(model.parameters())
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), param.dtype)
    return {k: (v.to(param.device, dtype=dtype if v.is_floating_point() else v.dtype)
                if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


# -- reading the records --------------------------------------------------------------------------
def select(records: list[dict], *, keep_top: float | None = None, drop_bottom: float | None = None,
           min_score: float | None = None) -> list[int]:
    """The indices a filtered copy keeps, in order: the scored samples the one rule given keeps
    (``keep_top`` / ``drop_bottom``: a percentage of the scored samples, highest / lowest score;
    ``min_score``: score >= it), every text-only sample (no image to judge it by), no sample that
    could not be scored. Ties are broken by input order."""
    rules = [r for r in (keep_top, drop_bottom, min_score) if r is not None]
    if len(rules) != 1:
        raise CALConfigError("give exactly one of keep_top, drop_bottom, min_score")
    for name, value in (("keep_top", keep_top), ("drop_bottom", drop_bottom)):
        if value is not None and not 0 < value <= 100:
            raise CALConfigError(f"{name} is a percentage in (0, 100], got {value:g}")
    scored = sorted((r for r in records if r["score"] is not None), key=lambda r: (r["score"], r["index"]))
    if keep_top is not None:
        kept = scored[len(scored) - round(keep_top / 100 * len(scored)):]
    elif drop_bottom is not None:
        kept = scored[round(drop_bottom / 100 * len(scored)):]
    else:
        kept = [r for r in scored if r["score"] >= min_score]
    text_only = [r for r in records if r["score"] is None and r.get("reason") == "no-image"]
    return sorted(r["index"] for r in kept + text_only)


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def summarize(records: list[dict], lowest: int = 10) -> dict:
    """Counts (samples, scored, not scored by reason), score quantiles and the ``lowest`` samples."""
    scored = sorted((r for r in records if r["score"] is not None), key=lambda r: (r["score"], r["index"]))
    reasons: dict[str, int] = {}
    for r in records:
        if r["score"] is None:
            reasons[r.get("reason", "error")] = reasons.get(r.get("reason", "error"), 0) + 1
    values = [r["score"] for r in scored]
    return dict(samples=len(records), scored=len(scored),
                failed=sum(n for k, n in reasons.items() if k != "no-image"),
                text_only=reasons.get("no-image", 0), reasons=reasons,
                quantiles={f"{q:g}": quantile(values, q) for q in QUANTILES} if values else {},
                lowest=[r["index"] for r in scored[:lowest]])
