"""The image-blind branch of contrastive decoding (`calplug.decoding`): its prefix from CAL's
contrast plan, then one new token per step, either in the main branch's decoder call (joined) or
in a decoder call of its own (two passes).

**Joined (the fast path).** After the prefill, the branch's rows are appended to the cache
``generate()`` holds (`calplug.decoding_cache.merge_rows`: left-padded to the main rows' length,
masked). At every later step a pre-hook on the text decoder turns the main branch's call into one
call on ``B + B'`` rows: the inputs it received for the new token (embedding, position ids: M-RoPE
or whatever the model computed, read and never recomputed, and every other per-row input), each
repeated for the branch's samples, with a 2-D padding mask whose branch rows are the branch's own.
A forward hook hands the model its ``B`` rows back and keeps the branch's final states; hooks on
the output projection run the branch's rows through it in the same call. Per step the decoder's
and the projection's weights are read once for both branches.

**Two passes (the fallback).** Where the caches cannot be merged (static caches, and the others
`calplug.decoding_cache` lists), the branch keeps its own cache and runs the decoder again on what
the main branch's decoder received, with its own cache positions and padding mask.

Both give the same tokens (the tests check each path against the same from-scratch reference).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch
from torch import nn

from . import decoding_cache
from .contrast import NON_SEQUENCE_DECODER_KWARGS, is_ready_mask, map_ready_mask
from .errors import CALInputError, UnsupportedModelError

# Why a model cannot be decoded, found at its first decoding step (`decoding.DecodingSession.step`
# prefixes the class and the transformers version).
NO_EMBEDS = ("its text decoder received no inputs_embeds at a decoding step (a decoder that embeds "
             "token ids itself, as Chameleon's and Emu3's do): contrastive decoding extends its "
             "branch with the embeddings the main branch's decoder received")
NO_POSITIONS = ("its text decoder received neither position_ids nor cache_position at a decoding "
                "step (it numbers positions itself): the contrast branch cannot tell the new "
                "token's position")
from .hookspecs import ContrastPlan, MainPass

# The cache argument of a forward / decoder call ("cache" from transformers 5.2x).
CACHE_ARGUMENTS = ("cache", "past_key_values")


@dataclasses.dataclass
class ContrastBranch:
    """The image-blind branch of one ``generate`` call.

    samples:    long ``[B']``, the sample of each of its rows.
    keys:       ``[B', n]`` its padding mask so far (n = its cache length; joined: the main's).
    states:     ``[B', d]`` the final hidden state of each row that predicts its next token.
    valid:      long ``[S]``: the rows of ``states`` that hold a contrast state (not those of
                samples without an image, nor, at the first step, a prompt with no text before
                its image); ``valid_samples`` their samples.
    joined:     its rows live in the main branch's cache and decoder call (`join`).
    unjoined:   why not, when not (None while joined or before `join`).
    projected:  ``[B', V]`` the output projection of ``states`` when the joined call computed it.
    """

    decoder: nn.Module
    head: nn.Module
    transform: object
    cache_key: str
    cache: object
    samples: torch.Tensor
    keys: torch.Tensor
    states: torch.Tensor
    valid: torch.Tensor
    valid_samples: torch.Tensor
    contrasted: torch.Tensor   # long [S'], the rows whose samples the image reaches
    shortened: bool
    subset: bool               # samples is not every sample in order
    joined: bool = False
    unjoined: str | None = None
    main_rows: int = 0
    projected: torch.Tensor | None = None

    def logits(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``[B, V]`` contrast logits (``like``'s values on rows without a contrast) and
        bool ``[B]``, the samples that have a contrast value."""
        out = like.float()
        has = torch.zeros(like.shape[0], dtype=torch.bool, device=like.device)
        if self.valid.numel():
            if self.projected is not None:
                logits = self.projected.index_select(0, self.valid)
            else:
                logits = self.head(self.states.index_select(0, self.valid))
            if self.transform is not None:  # the model's own logits: transformed, vocabulary cut
                logits = self.transform.full_logits(logits)
            out = out.index_copy(0, self.valid_samples, logits.float())
            has[self.valid_samples] = True
        return out, has

    # -- joined -------------------------------------------------------------------------------
    def join(self, main_cache, rows: int, length: int) -> bool:
        """Append this branch's rows to ``main_cache`` (``rows`` main rows of ``length``
        positions); on success later steps run through `joined_step`."""
        reason = decoding_cache.unmergeable(main_cache)
        if reason is None:
            reason = decoding_cache.merge_rows(main_cache, self.cache, rows, self.samples.numel())
        if reason is not None:
            self.unjoined = reason
            return False
        missing = length - self.keys.shape[1]
        self.keys = torch.cat([self.keys.new_zeros(self.keys.shape[0], missing), self.keys], 1)
        self.cache, self.joined, self.main_rows = main_cache, True, rows
        return True

    def leave(self) -> None:
        """Give ``generate()``'s cache its own rows back (after the last step)."""
        if self.joined:
            decoding_cache.trim_rows(self.cache, self.main_rows, self.main_rows + self.samples.numel())
            self.joined = False

    @contextlib.contextmanager
    def joined_step(self, names: list[str], call_mask) -> Iterator[None]:
        """Inside the block, the first call of the decoder (and of the output projection) runs
        the main rows and this branch's rows together; the model sees its own rows only."""
        B = self.main_rows
        state = {"decoder": False, "head": False}

        def before_decoder(module, args, kwargs):
            if state["decoder"]:
                raise CALInputError("the text decoder ran twice in one decoding step: contrastive "
                                    "decoding's joined step expects one call per new token")
            state["decoder"] = True
            step = dict(zip(names, args))
            step.update(kwargs)
            return (), self._joined_kwargs(step, call_mask)

        def after_decoder(module, args, kwargs, output):
            hidden = _final_hidden(output)
            self.states = hidden[B:, -1]
            self.valid = self.contrasted
            self.valid_samples = self.samples.index_select(0, self.contrasted)
            self.projected = None
            return _main_rows(output, B, B + self.samples.numel())

        def before_head(module, args):
            x = args[0] if args else None
            if state["head"] or not state["decoder"] or not isinstance(x, torch.Tensor) \
                    or x.shape[0] != B or not (x.dim() == 2 or (x.dim() == 3 and x.shape[1] == 1)):
                return None
            state["head"] = True
            extra = self.states.to(x.dtype) if x.dim() == 2 else self.states.to(x.dtype).unsqueeze(1)
            return (torch.cat([x, extra], 0),) + tuple(args[1:])

        def after_head(module, args, output):
            if state["head"] != "done" and state["head"]:
                state["head"] = "done"
                out = output[B:]
                self.projected = out if out.dim() == 2 else out[:, -1]
                return output[:B]
            return None

        handles = [self.decoder.register_forward_pre_hook(before_decoder, with_kwargs=True),
                   self.decoder.register_forward_hook(after_decoder, with_kwargs=True),
                   self.head.register_forward_pre_hook(before_head),
                   self.head.register_forward_hook(after_head)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        if not state["decoder"]:
            raise CALInputError("the text decoder did not run in a decoding step: contrastive "
                                "decoding extends its branch in the main branch's decoder call")

    def _joined_kwargs(self, step: dict, call_mask) -> dict:
        B, S = self.main_rows, self.samples
        embeds = step.get("inputs_embeds")
        if embeds is None:
            raise UnsupportedModelError(NO_EMBEDS)
        if step.get("position_ids") is None and step.get("cache_position") is None:
            raise UnsupportedModelError(NO_POSITIONS)
        new = embeds.shape[1]
        kwargs = {}
        for name, value in step.items():
            if name in CACHE_ARGUMENTS or name == "attention_mask":
                continue
            if name in NON_SEQUENCE_DECODER_KWARGS:
                kwargs[name] = value
            elif name == "position_ids" and isinstance(value, torch.Tensor):
                dim = value.dim() - 2
                value = value.expand(*value.shape[:dim], B, value.shape[-1])
                kwargs[name] = torch.cat([value, value.index_select(dim, S)], dim)
            else:
                kwargs[name] = _with_rows(value, B, S)
        main_mask = call_mask if isinstance(call_mask, torch.Tensor) and call_mask.dim() == 2 else None
        length = self.keys.shape[1]
        if main_mask is None:
            main_mask = torch.ones(B, length + new, dtype=torch.long, device=embeds.device)
        elif main_mask.shape[1] != length + new:
            raise CALInputError(f"generate()'s attention mask has {main_mask.shape[1]} positions at a "
                                f"decoding step whose cache holds {length} and {new} new: contrastive "
                                "decoding needs the mask over the whole sequence")
        self.keys = torch.cat([self.keys, main_mask[:, -new:].index_select(0, S).to(self.keys)], 1)
        kwargs["attention_mask"] = torch.cat([main_mask, self.keys.to(main_mask)], 0)
        kwargs[self.cache_key] = self.cache
        kwargs["use_cache"] = True
        return kwargs

    # -- two passes ---------------------------------------------------------------------------
    def extend(self, step: dict, call_mask) -> None:
        """Run the decoder on the token(s) the main branch's decoder just received (``step``: its
        keyword arguments), with this branch's cache and padding mask."""
        B = step["inputs_embeds"].shape[0] if step.get("inputs_embeds") is not None else -1
        kwargs = {}
        for name, value in step.items():
            if name in NON_SEQUENCE_DECODER_KWARGS or name == "attention_mask":
                continue
            if self.subset and isinstance(value, torch.Tensor):
                if name == "position_ids":
                    value = value.index_select(value.dim() - 2, self.samples)
                elif value.dim() > 0 and value.shape[0] == B:
                    value = value.index_select(0, self.samples)
            kwargs[name] = value
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise UnsupportedModelError(NO_EMBEDS)
        new = embeds.shape[1]
        if kwargs.get("position_ids") is None:  # the decoder counts positions from its cache
            position = step.get("cache_position")
            if position is None:
                raise UnsupportedModelError(NO_POSITIONS)
            kwargs["position_ids"] = position.view(1, -1).expand(self.samples.numel(), -1)
        if isinstance(call_mask, torch.Tensor) and call_mask.dim() == 2:
            grown = call_mask[:, -new:].index_select(0, self.samples)
        else:
            grown = torch.ones(self.samples.numel(), new, device=self.keys.device)
        length = self.keys.shape[1]
        self.keys = torch.cat([self.keys, grown.to(self.keys)], dim=1)
        kwargs["attention_mask"] = self.keys
        if step.get("cache_position") is not None:
            kwargs["cache_position"] = torch.arange(length, length + new, device=self.keys.device)
        kwargs[self.cache_key] = self.cache
        kwargs["use_cache"] = True
        self.states = _final_hidden(self.decoder(**kwargs))[:, -1]
        self.valid = self.contrasted
        self.valid_samples = self.samples.index_select(0, self.contrasted)


def _with_rows(value, B: int, samples: torch.Tensor):
    """A per-row decoder input (first axis ``B``) with the branch's rows appended; tuples and
    lists element by element; anything else as it is."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == B:
            return torch.cat([value, value.index_select(0, samples.to(value.device))], 0)
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_with_rows(v, B, samples) for v in value)
    return value


def _main_rows(output, B: int, total: int):
    """The decoder's output with every per-row tensor cut back to the main rows."""
    def cut(value):
        if isinstance(value, torch.Tensor):
            return value[:B] if value.dim() > 0 and value.shape[0] == total else value
        if isinstance(value, (tuple, list)):
            return type(value)(cut(v) for v in value)
        return value

    if isinstance(output, tuple):
        return type(output)(cut(v) for v in output)
    for key in list(output.keys()):
        output[key] = cut(output[key])
    return output


def start_branch(main: MainPass, plan: ContrastPlan, cache_key: str, cache) -> ContrastBranch:
    """Run the plan's decoder call once with ``cache`` (a fresh cache, or None: the decoder makes
    one) and keep the state that predicts each sample's first new token."""
    B, L = main.visual_mask.shape
    device = main.visual_mask.device
    kwargs = dict(plan.decoder_kwargs)
    samples = torch.arange(B, device=device) if plan.samples is None else plan.samples
    keys = plan.keys
    if keys is None:
        keys = kwargs.get("attention_mask")
        if not (isinstance(keys, torch.Tensor) and keys.dim() == 2):
            raise CALInputError("the contrast plan gives its decoder a ready (4-D or per-layer) mask "
                                "and no 2-D `keys` mask: contrastive decoding cannot extend it "
                                "(ContrastPlan.keys, docs/plugins.md)")
    kwargs, keys, rows = right_aligned(kwargs, keys, plan.rows)
    kwargs[cache_key] = cache
    kwargs["use_cache"] = True
    with torch.no_grad():
        out = main.decoder(**kwargs)
    if cache is None:
        cache = returned_cache(out)
    hidden = _final_hidden(out)
    flat = hidden.reshape(-1, hidden.shape[-1])
    first = rows[:, L - 1].index_select(0, samples)         # each row's state for the first token
    with_image = main.with_image.to(device).index_select(0, samples)
    contrasted = with_image.nonzero().squeeze(1)
    valid = (with_image & (first >= 0)).nonzero().squeeze(1)
    subset = samples.numel() != B or not torch.equal(samples, torch.arange(B, device=device))
    return ContrastBranch(main.decoder, main.lm_head, main.logit_transform, cache_key, cache, samples,
                          keys, flat.index_select(0, first.clamp(min=0)), valid,
                          samples.index_select(0, valid), contrasted,
                          shortened=hidden.shape[1] != L or samples.numel() != B, subset=subset)


def right_aligned(kwargs: dict, keys: torch.Tensor, rows: torch.Tensor):
    """The plan's rows shifted right so that each ends at its last attended position (padding
    first, as ``generate`` pads): a cache is then extended right after every row's last token,
    which decoders that carry a state across positions (convolutions, linear attention) need.
    Every ``[B', n, ...]`` input, the position ids and ready masks (queries and keys) move alike;
    ``rows`` are remapped."""
    S, n = keys.shape
    attended = keys.bool()
    trailing = n - 1 - torch.where(attended, torch.arange(n, device=keys.device), -1).max(1).values
    trailing = torch.where(attended.any(1), trailing, torch.zeros_like(trailing))
    if not bool(trailing.any()):
        return kwargs, keys, rows
    index = (torch.arange(n, device=keys.device).unsqueeze(0) - trailing.unsqueeze(1)) % n   # [S, n]

    def along(value: torch.Tensor, batch: int, dim: int) -> torch.Tensor:
        shape = [1] * value.dim()
        shape[batch], shape[dim] = S, n
        where = index.view(shape).expand(*value.shape[:dim], n, *value.shape[dim + 1:])
        return value.gather(dim, where.to(value.device))

    out = {}
    for name, value in kwargs.items():
        if name == "attention_mask" and is_ready_mask(value):
            value = map_ready_mask(value, lambda m: along(along(m.expand(S, *m.shape[1:]), 0, 2), 0, 3))
        elif name == "position_ids" and isinstance(value, torch.Tensor):
            value = along(value.expand(*value.shape[:-2], S, n), value.dim() - 2, value.dim() - 1)
        elif isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == (S, n):
            value = along(value, 0, 1)
        out[name] = value
    keys = along(keys, 0, 1)
    slot = rows % n
    shifted = rows - slot + (slot + trailing.to(rows.device)[rows.clamp(min=0) // n]) % n
    return out, keys, torch.where(rows >= 0, shifted, rows)


def _final_hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state


def returned_cache(out):
    """The cache a decoder (or model) call returned."""
    for name in CACHE_ARGUMENTS:
        value = getattr(out, name, None)
        if value is not None:
            return value
    if isinstance(out, (tuple, list)) and len(out) > 1:
        return out[1]
    raise CALInputError("the text decoder returned no cache for the contrast branch")
