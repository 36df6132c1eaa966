"""``calplug bench``: time and peak memory of a plain training step, a CAL step in the default
(``drop``) and in the faithful (``mask``) mode, and the default with the chunked loss
(``loss_chunk``), against the floor of an exact "without the image" pass (one no-grad forward of
the decoder over the text tokens alone). The contrast pass is also timed inside each CAL step,
through calplug's ``calplug_observe_contrast_pass`` hook (`ContrastPassTimer`).

The model is a random-init transformers Llava built from a config (LLaVA-1.5 shaped: 576 image
tokens from a 336 px / patch-14 CLIP tower, a few hundred text tokens, vocabulary 32,000); the
sizes are options. Steps are forward + backward (no optimizer step: it is the same in every
variant). Repetitions are interleaved (each round runs every variant, in a rotating order) and
the report gives medians. Peak memory is measured in separate runs after the timing:

* CUDA: ``torch.cuda.max_memory_allocated`` during the step, minus what was allocated before.
* CPU: the PyTorch profiler's allocator events (``profile_memory=True``): the running total of
  bytes the CPU allocator handed out and got back during the step, in time order; its maximum is
  the step's peak tensor memory above what was alive before, the CPU counterpart of the CUDA
  figure (it leaves out malloc caching and non-tensor memory, which no variant changes).

See docs/performance.md.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import platform
import statistics
import time
from typing import Callable

import torch

from .. import plugins
from ..gap import IGNORE_INDEX
from .common import check_writable_file
from ..hookspecs import hookimpl

VARIANTS = ("plain", "cal_default", "cal_faithful", "cal_chunked", "floor")
LABELS = {
    "plain": "plain step (model's own loss)",
    "cal_default": "CAL default (contrast=drop)",
    "cal_faithful": "CAL faithful (contrast=mask)",
    "cal_chunked": "CAL default + loss_chunk={chunk}",
    "floor": "floor (no-grad text-only decoder)",
}


@dataclasses.dataclass
class BenchConfig:
    device: str = "auto"
    dtype: str = "auto"
    batch: int = 2
    image_tokens: int = 576
    text_tokens: int = 256
    text_before_image: int = 35
    answer_share: float = 0.5
    vocab: int = 32000
    hidden: int = 384
    intermediate: int = 1024
    layers: int = 8
    heads: int = 6
    kv_heads: int = 6
    vision_hidden: int = 64
    vision_layers: int = 1
    attn: str = "sdpa"
    loss_chunk: int = 1024
    repeats: int = 7
    warmup: int = 1
    memory: bool = True
    threads: int | None = None
    seed: int = 0

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[self.dtype]


# -- checking the options --------------------------------------------------------------------------
# option -> (smallest valid value, what it counts): each must be an integer at least that large.
MINIMUMS = {
    "batch": (1, "samples per micro-batch"), "image_tokens": (1, "image tokens per sample"),
    "text_tokens": (2, "text tokens of the first sample"),
    "text_before_image": (0, "text tokens before the image"),
    "vocab": (8, "vocabulary size"), "hidden": (2, "decoder width"), "intermediate": (1, "decoder MLP size"),
    "layers": (1, "decoder layers"), "heads": (1, "attention heads"), "kv_heads": (1, "key/value heads"),
    "vision_hidden": (2, "CLIP tower width"), "vision_layers": (1, "CLIP tower layers"),
    "loss_chunk": (0, "rows per loss chunk (0 = skip)"), "repeats": (1, "timed rounds"),
    "warmup": (0, "warm-up rounds"),
}


def validate(cfg: BenchConfig) -> None:
    """Every option in range before any model is built, each error naming the flag and a valid
    value (a zero batch would otherwise end in "max() arg is an empty sequence")."""
    from ..errors import CALConfigError

    for name, (low, what) in MINIMUMS.items():
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            default = getattr(BenchConfig, name)
            raise CALConfigError(f"--{name.replace('_', '-')} must be an integer >= {low} ({what}), "
                                 f"got {value!r}: e.g. --{name.replace('_', '-')} {max(default, low)}")
    if cfg.threads is not None and cfg.threads < 1:
        raise CALConfigError(f"--threads must be >= 1, got {cfg.threads}: e.g. --threads 4, or leave it out")
    if not 0.0 < cfg.answer_share <= 1.0:
        raise CALConfigError(f"answer_share must be in (0, 1], got {cfg.answer_share}")
    side = math.isqrt(cfg.image_tokens)
    if side * side != cfg.image_tokens:
        raise CALConfigError(f"--image-tokens must be a square number (576 = 24 x 24), got {cfg.image_tokens}")
    if cfg.hidden % cfg.heads or cfg.heads % cfg.kv_heads or (cfg.hidden // cfg.heads) % 2:
        raise CALConfigError(f"--hidden ({cfg.hidden}) must be a multiple of --heads ({cfg.heads}) "
                             "with an even quotient (the rotary head size), and --heads a multiple of "
                             f"--kv-heads ({cfg.kv_heads}): e.g. --hidden 384 --heads 6 --kv-heads 6")
    if cfg.vision_hidden % 2:
        raise CALConfigError(f"--vision-hidden must be even (the tower has 2 heads), got {cfg.vision_hidden}")
    if cfg.text_before_image >= cfg.text_tokens - cfg.batch:
        raise CALConfigError(f"--text-before-image ({cfg.text_before_image}) must be smaller than "
                             f"--text-tokens ({cfg.text_tokens}) minus --batch ({cfg.batch}): the rest "
                             "holds the question and the supervised answer")
    if cfg.device != "auto":
        try:
            torch.device(cfg.device)
        except (RuntimeError, TypeError):
            raise CALConfigError(f"--device {cfg.device!r} is not a device torch knows: use cpu, cuda, "
                                 "cuda:N or auto") from None


# -- model and batch ------------------------------------------------------------------------------
def build_model(cfg: BenchConfig):
    """A random-init LLaVA-shaped `LlavaForConditionalGeneration` (CLIP tower -> Llama decoder)."""
    from ..testing import tiny_llava

    validate(cfg)
    side = math.isqrt(cfg.image_tokens)
    patch = 14
    model = tiny_llava(cfg.seed, vocab_size=cfg.vocab, hidden_size=cfg.hidden, layers=cfg.layers,
                       intermediate_size=cfg.intermediate, heads=cfg.heads, kv_heads=cfg.kv_heads,
                       image_size=side * patch, patch_size=patch, vision_hidden=cfg.vision_hidden,
                       vision_layers=cfg.vision_layers, vision_heads=2, vision_feature_layer=-1,
                       image_token=cfg.vocab - 1,
                       max_positions=max(4096, 2 * (cfg.image_tokens + cfg.text_tokens)),
                       attn_implementation=cfg.attn)
    return model.to(device=cfg.resolved_device(), dtype=cfg.resolved_dtype()).train()


def build_batch(model, cfg: BenchConfig) -> dict:
    """LLaVA-1.5 layout per sample: [system + 'USER:'][image][question][answer], right-padded.

    Sample b has ``text_tokens - 16 b`` text tokens (so the batch has padding); the answer (the
    last ``answer_share`` of the text) is supervised, the rest is labelled -100.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    image_token = model.config.image_token_index
    seqs, labs = [], []
    for b in range(cfg.batch):
        n_text = max(cfg.text_tokens - 16 * b, cfg.text_before_image + 2)
        text = torch.randint(3, image_token - 1, (n_text,), generator=g)
        lab = torch.full_like(text, IGNORE_INDEX)
        n_answer = max(1, int(round(cfg.answer_share * (n_text - cfg.text_before_image))))
        lab[-n_answer:] = text[-n_answer:]
        k = cfg.text_before_image
        seqs.append(torch.cat([text[:k], torch.full((cfg.image_tokens,), image_token), text[k:]]))
        labs.append(torch.cat([lab[:k], torch.full((cfg.image_tokens,), IGNORE_INDEX), lab[k:]]))
    L = max(s.numel() for s in seqs)
    input_ids = torch.zeros(cfg.batch, L, dtype=torch.long)
    labels = torch.full((cfg.batch, L), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(cfg.batch, L, dtype=torch.long)
    for b, (s, lab) in enumerate(zip(seqs, labs)):
        input_ids[b, :s.numel()], labels[b, :s.numel()], mask[b, :s.numel()] = s, lab, 1
    vc = model.config.vision_config
    pixels = torch.randn(cfg.batch, 3, vc.image_size, vc.image_size, generator=g)
    device, dtype = cfg.resolved_device(), cfg.resolved_dtype()
    return dict(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                labels=labels.to(device), pixel_values=pixels.to(device=device, dtype=dtype))


def floor_inputs(model, batch: dict) -> dict:
    """Decoder inputs of the floor: each sample's text tokens alone (no image positions, no
    padding), packed to the left, with the position ids they have in the full sequence."""
    from ..integrations import compat

    decoder, _ = compat.vlm_decoder_and_head(model)
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    keep = mask & (ids != model.config.image_token_index)
    counts = keep.sum(1)
    length = int(counts.max())
    B = ids.shape[0]
    text_ids = torch.zeros(B, length, dtype=ids.dtype, device=ids.device)
    positions = torch.zeros(B, length, dtype=torch.long, device=ids.device)
    for b in range(B):
        where = keep[b].nonzero().squeeze(1)
        text_ids[b, :where.numel()] = ids[b, where]
        positions[b, :where.numel()] = where
    attention = (torch.arange(length, device=ids.device).unsqueeze(0) < counts.unsqueeze(1)).long()
    with torch.no_grad():
        embeds = decoder.get_input_embeddings()(text_ids)
    return dict(inputs_embeds=embeds, attention_mask=attention, position_ids=positions, use_cache=False)


# -- the variants ---------------------------------------------------------------------------------
def make_steps(model, batch: dict, loss_chunk: int = 0) -> dict[str, Callable[[], float | None]]:
    import calplug
    from ..integrations import compat

    decoder, _ = compat.vlm_decoder_and_head(model)
    floor_kwargs = floor_inputs(model, batch)
    device = batch["input_ids"].device

    def train_step(**cal):
        def step():
            """One forward + backward; returns the seconds the forward phase took."""
            start = time.perf_counter()
            ctx = calplug.enabled(model, **cal) if cal else contextlib.nullcontext()
            with ctx:
                loss = model(**batch).loss
            _sync(device)
            forward = time.perf_counter() - start
            loss.backward()
            model.zero_grad(set_to_none=True)
            return forward
        return step

    def floor():
        with torch.no_grad():
            decoder(**floor_kwargs)

    steps = {
        "plain": train_step(),
        "cal_default": train_step(contrast="drop"),
        "cal_faithful": train_step(contrast="mask"),
    }
    if loss_chunk:
        steps["cal_chunked"] = train_step(contrast="drop", loss_chunk=loss_chunk)
    steps["floor"] = floor
    return steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ContrastPassTimer:
    """A calplug plugin that times every contrast pass (calplug's no-grad decoder call and target
    logits) through the declared observer ``calplug_observe_contrast_pass``: the device is
    synchronised at "start" and at "end", and the wall time between them is appended to
    ``seconds``. Observing, not replacing calplug's functions, keeps the timed code the code
    that trains."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: list[float] = []
        self._start: float | None = None

    @hookimpl
    def calplug_observe_contrast_pass(self, model, phase: str) -> None:
        _sync(self.device)
        if phase == "start":
            self._start = time.perf_counter()
        elif phase == "end" and self._start is not None:
            self.seconds.append(time.perf_counter() - self._start)
            self._start = None


@contextlib.contextmanager
def contrast_probe(device: torch.device):
    """Record the seconds of every contrast pass made inside the block (a `ContrastPassTimer`
    registered with calplug's plugin manager for the block's duration); yields the list."""
    timer = ContrastPassTimer(device)
    plugins.register(timer, name=f"calplug-bench-contrast-timer-{id(timer)}")
    try:
        yield timer.seconds
    finally:
        plugins.unregister(timer)


def time_steps(steps: dict, device: torch.device, repeats: int, warmup: int):
    """Interleaved repetitions: every round runs each variant once, the order rotating by one
    each round so that no variant always follows the same one. Returns the seconds of every
    repetition, of its forward phase (training steps), and of its contrast pass (CAL steps)."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    forward: dict[str, list[float]] = {}
    contrast: dict[str, list[float]] = {}
    with contrast_probe(device) as probe:
        for r in range(repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                probe.clear()
                _sync(device)
                start = time.perf_counter()
                phase = steps[name]()
                _sync(device)
                times[name].append(time.perf_counter() - start)
                if phase is not None:
                    forward.setdefault(name, []).append(phase)
                if probe:
                    contrast.setdefault(name, []).append(sum(probe))
    return times, forward, contrast


def peak_memory(step: Callable[[], None], device: torch.device) -> int | None:
    """Peak bytes allocated during ``step`` above what was allocated before it."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    return cpu_peak_memory(step)


def cpu_peak_memory(step: Callable[[], None]) -> int | None:
    """Peak of the running total of CPU-allocator bytes during ``step`` (PyTorch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        return None
    events = [(e.start_ns(), e.nbytes()) for e in results.events() if e.name() == "[memory]"]
    events.sort(key=lambda x: x[0])
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's C++ start/stop lines (written straight to file descriptor 2)."""
    import os
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (captured, embedded): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# -- the report -----------------------------------------------------------------------------------
def benchmark(cfg: BenchConfig) -> dict:
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = cfg.resolved_device()
    model = build_model(cfg)
    batch = build_batch(model, cfg)
    steps = make_steps(model, batch, cfg.loss_chunk)
    times, forward, contrast = time_steps(steps, device, cfg.repeats, cfg.warmup)
    memory = {name: (peak_memory(step, device) if cfg.memory else None) for name, step in steps.items()}
    med = {name: statistics.median(ts) for name, ts in times.items()}
    fwd = {name: statistics.median(ts) for name, ts in forward.items()}
    plain, floor = med["plain"], med["floor"]
    cal_names = [n for n in steps if n not in ("plain", "floor")]
    result = {
        **describe(cfg, model, batch),
        "times": times,
        "forward_times": forward,
        "median_s": med,
        "forward_median_s": fwd,
        "overhead_vs_plain": {n: med[n] / plain - 1 for n in cal_names},
        "extra_over_floor": {n: (med[n] - plain) / floor for n in cal_names},
        "paired_extra_over_floor": {
            n: statistics.median(c - p for c, p in zip(times[n], times["plain"])) / floor
            for n in cal_names},
        "forward_extra_over_floor": {n: (fwd[n] - fwd["plain"]) / floor for n in cal_names},
        "contrast_times": contrast,
        "contrast_over_floor": {n: statistics.median(contrast[n]) / floor if n in contrast else 0.0
                                for n in cal_names},
        "peak_bytes": memory,
        "peak_vs_plain": {n: (memory[n] / memory["plain"] - 1) if memory.get(n) and memory.get("plain") else None
                          for n in cal_names},
        "memory_method": ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                          else "torch.profiler CPU allocator events") if cfg.memory else None,
    }
    result["targets"] = {
        "extra_over_floor_default<=1.5": result["extra_over_floor"]["cal_default"] <= 1.5,
        "peak_default_within_5%": (None if result["peak_vs_plain"]["cal_default"] is None
                                   else result["peak_vs_plain"]["cal_default"] <= 0.05),
    }
    return result


def describe(cfg: BenchConfig, model, batch: dict) -> dict:
    """The run's ``config``, ``environment`` and ``shape`` (model and batch sizes), as reported."""
    from ..integrations import compat

    device = cfg.resolved_device()
    decoder, lm_head = compat.vlm_decoder_and_head(model)
    return {
        "config": dataclasses.asdict(cfg),
        "environment": {
            "device": str(device), "dtype": str(cfg.resolved_dtype()).replace("torch.", ""),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": _transformers_version(), "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "shape": {
            "batch": cfg.batch, "seq_len": int(batch["input_ids"].shape[1]),
            "image_tokens": cfg.image_tokens,
            "text_tokens": [int(x) for x in ((batch["attention_mask"] == 1)
                                             & (batch["input_ids"] != model.config.image_token_index)).sum(1)],
            "supervised": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
            "decoder_params": sum(p.numel() for p in decoder.parameters()),
            "lm_head_params": lm_head.weight.numel(),
        },
    }


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def header_lines(r: dict, title: str) -> list[str]:
    """What ran where: device, versions, the model's and the batch's sizes."""
    env, shape, cfg = r["environment"], r["shape"], r["config"]
    return [
        f"{title}: device={env['device']}{' (' + env['gpu'] + ')' if env['gpu'] else ''} "
        f"dtype={env['dtype']} threads={env['threads']} torch={env['torch']} "
        f"transformers={env['transformers']}",
        f"model: Llava, CLIP tower {cfg['vision_layers']}x{cfg['vision_hidden']} "
        f"({14 * math.isqrt(cfg['image_tokens'])} px, patch 14), "
        f"Llama decoder {cfg['layers']} layers x {cfg['hidden']} (ffn {cfg['intermediate']}, heads "
        f"{cfg['heads']}/{cfg['kv_heads']}), vocab {cfg['vocab']}, attn={cfg['attn']}; decoder "
        f"{shape['decoder_params'] / 1e6:.1f}M params, lm_head {shape['lm_head_params'] / 1e6:.1f}M",
        f"batch: {shape['batch']} samples x ({shape['image_tokens']} image + "
        f"{'/'.join(map(str, shape['text_tokens']))} text tokens), seq_len {shape['seq_len']}, "
        f"{shape['supervised']} supervised rows",
    ]


def format_report(r: dict) -> str:
    cfg = r["config"]
    names = [n for n in VARIANTS if n in r["times"]]
    cal_names = [n for n in names if n not in ("plain", "floor")]
    label = {n: LABELS[n].format(chunk=cfg["loss_chunk"]) for n in names}
    lines = header_lines(r, "calplug bench") + [
        f"timing: median of {cfg['repeats']} interleaved repetitions (+{cfg['warmup']} warm-up); "
        f"step = forward + backward",
        "",
        f"{'variant':<36}{'median s':>10}{'min s':>9}{'max s':>9}{'vs plain':>10}"
        f"{'peak MiB':>11}{'vs plain':>10}",
    ]
    for name in names:
        ts = r["times"][name]
        over = _pct(r["overhead_vs_plain"][name]) if name in cal_names else ""
        mem_over = _pct(r["peak_vs_plain"][name]) if name in cal_names else ""
        lines.append(f"{label[name]:<36}{r['median_s'][name]:>10.3f}{min(ts):>9.3f}{max(ts):>9.3f}"
                     f"{over:>10}{_mb(r['peak_bytes'][name]):>11}{mem_over:>10}")

    def row(title: str, key: str) -> str:
        return f"{title:<46}" + "".join(f"{r[key][n]:>10.2f}" for n in cal_names)

    lines += [
        "",
        f"{'(cal - plain) / floor':<46}" + "".join(f"{n.replace('cal_', ''):>10}" for n in cal_names),
        row("  from the step medians", "extra_over_floor"),
        row("  median over rounds of (cal - plain)", "paired_extra_over_floor"),
        row("  from the forward-phase medians", "forward_extra_over_floor"),
        row("contrast pass alone (timed inside) / floor", "contrast_over_floor"),
    ]
    if r["memory_method"]:
        lines.append(f"peak memory: {r['memory_method']}; bytes allocated during one step above "
                     "what was alive before it")
    t = r["targets"]
    verdict = {True: "met", False: "NOT met", None: "n/a"}
    lines.append("targets: default (cal - plain) / floor <= 1.5 (step medians): "
                 f"{verdict[t['extra_over_floor_default<=1.5']]}; default peak memory within 5% "
                 f"of plain: {verdict[t['peak_default_within_5%']]}")
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------------
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, batch and timing options (``calplug bench`` and ``calplug audit-bench``)."""
    d = BenchConfig()
    a = parser.add_argument
    a("--device", default=d.device, help="cpu, cuda, cuda:N or auto (default: auto)")
    a("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"],
      help="auto = bfloat16 on CUDA, float32 on CPU")
    a("--batch", type=int, default=d.batch, help=f"samples per micro-batch (default {d.batch})")
    a("--image-tokens", type=int, default=d.image_tokens, help="image tokens per sample, a square (576)")
    a("--text-tokens", type=int, default=d.text_tokens,
      help=f"text tokens of the first sample; sample b has 16 b fewer (default {d.text_tokens})")
    a("--text-before-image", type=int, default=d.text_before_image,
      help=f"text tokens before the image (system prompt; default {d.text_before_image})")
    a("--vocab", type=int, default=d.vocab, help=f"vocabulary size (default {d.vocab})")
    a("--hidden", type=int, default=d.hidden, help=f"decoder hidden size (default {d.hidden})")
    a("--intermediate", type=int, default=d.intermediate, help=f"decoder MLP size (default {d.intermediate})")
    a("--layers", type=int, default=d.layers, help=f"decoder layers (default {d.layers})")
    a("--heads", type=int, default=d.heads, help=f"attention heads (default {d.heads})")
    a("--kv-heads", type=int, default=d.kv_heads, help=f"key/value heads (default {d.kv_heads})")
    a("--vision-hidden", type=int, default=d.vision_hidden, help=f"CLIP tower width (default {d.vision_hidden})")
    a("--vision-layers", type=int, default=d.vision_layers, help=f"CLIP tower layers (default {d.vision_layers})")
    a("--attn", default=d.attn, choices=["sdpa", "eager"], help="attention implementation (default sdpa)")
    a("--repeats", type=int, default=d.repeats, help=f"interleaved timed rounds (default {d.repeats})")
    a("--warmup", type=int, default=d.warmup, help=f"untimed warm-up rounds (default {d.warmup})")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a("--seed", type=int, default=d.seed)
    a("--json", metavar="PATH", help="also write the full result (every timing) as JSON")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    add_model_arguments(parser)
    a = parser.add_argument
    a("--loss-chunk", type=int, default=d.loss_chunk,
      help=f"also time CAL default with loss_chunk=N (chunked loss, no full logits); 0 = skip "
           f"(default {d.loss_chunk})")
    a("--no-memory", action="store_true", help="skip the peak-memory runs")
    a("--decode", action="store_true",
      help="time contrastive decoding against plain generate() per new token instead (docs/decoding.md)")
    a("--new-tokens", type=int, default=32, help="--decode: new tokens per generate() call (default 32)")
    a("--check", action="store_true", help="exit 1 when a target is not met")


def checked_config(args: argparse.Namespace) -> BenchConfig:
    """The `BenchConfig` of the command line, every option checked (``--json`` writable too)."""
    from ..errors import CALConfigError

    cfg = BenchConfig(
        device=args.device, dtype=args.dtype, batch=args.batch, image_tokens=args.image_tokens,
        text_tokens=args.text_tokens, text_before_image=args.text_before_image, vocab=args.vocab,
        hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, heads=args.heads,
        kv_heads=args.kv_heads, vision_hidden=args.vision_hidden, vision_layers=args.vision_layers,
        attn=args.attn, loss_chunk=getattr(args, "loss_chunk", 0), repeats=args.repeats, warmup=args.warmup,
        memory=not getattr(args, "no_memory", True), threads=args.threads, seed=args.seed,
    )
    validate(cfg)
    if cfg.resolved_device().type == "cuda" and not torch.cuda.is_available():
        raise CALConfigError("--device cuda was asked for but torch.cuda.is_available() is False; use --device cpu")
    if args.json:
        check_writable_file("--json", args.json)
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = checked_config(args)
    if args.decode:
        from . import bench_decode

        return bench_decode.run(args, cfg, build_model(cfg))
    result = benchmark(cfg)
    print(format_report(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.check and not all(v for v in result["targets"].values() if v is not None):
        return 1
    return 0
