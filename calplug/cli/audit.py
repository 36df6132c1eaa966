"""``calplug audit``: the training samples whose answers the image does not support, found with
CAL's own contrast pass before training (`calplug.audit`, docs/audit.md).

    calplug audit --model DIR --data FILE [--image-folder DIR] --out OUTDIR [--drop-bottom 10]

``DIR`` is a folder written by ``save_pretrained`` with the model and its processor (chat template
included); ``FILE`` a LLaVA JSON, ShareGPT-style ``messages`` + ``images`` JSON, or JSON Lines of
either. Writes ``OUTDIR/scores.jsonl`` (one record per sample, in input order, appended batch by
batch: an interrupted run resumes from it), ``report.html`` (the lowest samples with their images
and a per-token heat map), ``scores.png`` (the histogram), ``audit.json`` (the run and its
summary) and, with ``--keep-top`` / ``--drop-bottom`` / ``--min-score``, ``filtered.json[l]`` (FILE
minus the samples left out, in FILE's format). A sample that cannot be scored gets ``"score":
null`` and an ``"error"``; the run goes on and exits 0. Bad arguments exit 2 with one line.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from .. import auditing, data_files, processing
from ..errors import CALConfigError
from . import audit_report
from .common import load_model_and_processor, prepare_output_dir, require_extras

CONTRASTS = ("drop", "mask", "blur")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# what must match for a run to resume another's scores.jsonl
IDENTITY = ("data_sha256", "model", "contrast", "score", "dtype", "max_length", "image_folder")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", required=True, help="folder written by save_pretrained: the model and its processor (chat template included)")
    a("--data", required=True, help="LLaVA JSON, ShareGPT-style messages + images JSON, or JSON Lines of either")
    a("--image-folder", default=None, help="where relative image paths start (default: the data file's folder)")
    a("--out", default="calplug-audit", help="output folder (default: ./calplug-audit); a run resumes from its scores.jsonl")
    a("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    a("--dtype", default="auto", choices=["auto", *DTYPES], help="auto = bfloat16 on CUDA, float32 on CPU")
    a("--batch-size", type=int, default=8, help="samples scored together (default 8)")
    a("--contrast", default="drop", choices=CONTRASTS,
      help="the image-blind pass, as in training: drop (default: the text tokens alone), mask, blur")
    a("--score", default="mean", choices=["mean", "min"],
      help="a sample's score: the mean (default) or the lowest of its answer tokens' log-probability gains")
    a("--max-length", type=int, default=None,
      help="longest sample in tokens (default: the model's max_position_embeddings / the tokenizer's limit)")
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--keep-top", metavar="P", help="write OUTDIR/filtered.json[l]: the P %% highest-scoring samples")
    rule.add_argument("--drop-bottom", metavar="P", help="write OUTDIR/filtered.json[l]: all but the P %% lowest-scoring")
    rule.add_argument("--min-score", type=float, metavar="S", help="write OUTDIR/filtered.json[l]: the samples scoring >= S")
    a("--report-samples", type=int, default=30, help="lowest samples shown in report.html (default 30)")
    a("--restart", action="store_true", help="discard OUTDIR/scores.jsonl and score every sample again")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a("--no-progress", action="store_true", help="no progress bar")


def percent(text: str | None, option: str) -> float | None:
    if text is None:
        return None
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        value = float("nan")
    if not 0 < value <= 100:
        raise CALConfigError(f"{option} takes a percentage in (0, 100], e.g. {option} 10, got {text!r}")
    return value


def check_arguments(args) -> dict:
    """Every option checked before the model loads; the filter rule as `auditing.select` takes it."""
    for option, value, low in (("--batch-size", args.batch_size, 1), ("--report-samples", args.report_samples, 0),
                               ("--max-length", args.max_length, 1), ("--threads", args.threads, 1)):
        if value is not None and value < low:
            raise CALConfigError(f"{option} must be >= {low}, got {value}")
    if args.image_folder is not None and not Path(args.image_folder).is_dir():
        raise CALConfigError(f"--image-folder {args.image_folder!r} is not a folder")
    if args.device != "auto":
        try:
            device = torch.device(args.device)
        except (RuntimeError, TypeError):
            raise CALConfigError(f"--device {args.device!r} is not a device torch knows: use cpu, cuda, cuda:N or auto") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CALConfigError("--device cuda was asked for but torch.cuda.is_available() is False; use --device cpu")
    rule = dict(keep_top=percent(args.keep_top, "--keep-top"), drop_bottom=percent(args.drop_bottom, "--drop-bottom"),
                min_score=args.min_score)
    return {k: v for k, v in rule.items() if v is not None}


def model_limit(model, processor) -> int | None:
    """The longest sequence the model takes: its text config's ``max_position_embeddings``, and the
    tokenizer's ``model_max_length`` where that is a real limit."""
    config = model.config
    text = getattr(config, "text_config", None) or config
    limits = [getattr(text, "max_position_embeddings", None)]
    tokenizer = getattr(processor, "tokenizer", processor)
    limits.append(getattr(tokenizer, "model_max_length", None))
    limits = [int(x) for x in limits if isinstance(x, int) and 0 < x < 10_000_000]
    return min(limits) if limits else None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_scores(path: Path, total: int) -> list[dict]:
    """The records an earlier run wrote, in order from index 0; a last line cut off by an
    interruption is removed from the file (it is scored again)."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    records, end = [], 0
    for line in raw.split(b"\n"):
        try:
            rec = json.loads(line)
        except ValueError:
            break
        if not isinstance(rec, dict) or rec.get("index") != len(records) or len(records) >= total:
            break
        records.append(rec)
        end += len(line) + 1
    if end > len(raw):  # the last record lacks its newline
        with open(path, "ab") as f:
            f.write(b"\n")
    elif end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(end)
    return records


def resume(out: Path, run: dict, total: int, restart: bool) -> list[dict]:
    """The records of an earlier run of the same audit in ``out``, to go on from."""
    scores, meta = out / "scores.jsonl", out / "audit.json"
    if restart:
        scores.unlink(missing_ok=True)
        return []
    if not scores.is_file() or scores.stat().st_size == 0:
        return []
    before = json.loads(meta.read_text()).get("run", {}) if meta.is_file() else {}
    differs = [k for k in IDENTITY if before.get(k) != run[k]]
    if differs:
        raise CALConfigError(f"--out {str(out)!r} holds scores.jsonl of another audit ({', '.join(differs)} "
                             "differ): pass --restart to discard it, or choose another --out")
    return read_scores(scores, total)


def run(args) -> int:
    require_extras()
    rule = check_arguments(args)
    data = data_files.read(args.data)
    root = Path(args.image_folder) if args.image_folder else data.path.parent
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    out = prepare_output_dir(args.out)
    model, processor = load_model_and_processor(
        args.model, dtype=dtype, fix="load them yourself and call calplug.audit(model, FILE, processor=processor)")
    if processing.chat_template(processor) is None:
        raise CALConfigError(f"--model {args.model!r}: its processor has no chat template, so the prompt side "
                             "cannot be formatted as training formats it: set processor.chat_template and "
                             "save_pretrained the processor again")
    max_length = args.max_length or model_limit(model, processor)
    run_info = dict(data=str(data.path.resolve()), data_sha256=sha256(data.path), model=str(Path(args.model).resolve()),
                    contrast=args.contrast, score=args.score, dtype=str(dtype).replace("torch.", ""),
                    max_length=max_length, image_folder=str(root.resolve()))
    records = resume(out, run_info, len(data), args.restart)
    model = model.to(device)
    header = (f"calplug audit: {len(data)} samples of {data.path.name} ({'JSON Lines' if data.lines else 'JSON'}), "
              f"model {Path(args.model).name} ({type(model).__name__}, {run_info['dtype']}, {device}), "
              f"contrast {args.contrast}, max length {max_length}")
    print(header + (f"; resuming after {len(records)} scored samples" if records else ""), flush=True)
    (out / "audit.json").write_text(json.dumps(dict(run=run_info), indent=1))
    seconds, new = score_all(model, processor, data, root, out / "scores.jsonl", records, args, max_length)
    summary = auditing.summarize(records)
    print(audit_report.format_summary(summary, records, args.score))
    if new:
        print(f"\naudited {new} samples in {seconds:.1f} s ({new / max(seconds, 1e-9):.1f} samples/s)")
    if summary["failed"]:
        print(f"{summary['failed']} samples could not be scored: their records in scores.jsonl say why")
    written = [out / "scores.jsonl"]
    written += write_report(model, processor, data, root, out, records, summary, header, args, rule, max_length)
    if rule:
        kept = auditing.select(records, **rule)
        path = data_files.write(data, kept, out / ("filtered.jsonl" if data.lines else "filtered.json"))
        print(f"filtered copy: kept {len(kept)} of {len(data)} samples ({summary['failed']} that could not be "
              f"scored left out); image paths as in {data.path.name} (relative to {root})")
        written.append(path)
    (out / "audit.json").write_text(json.dumps(dict(run=run_info, summary=summary, filter=rule or None,
                                                    seconds=seconds, scored_now=new), indent=1))
    print("wrote " + ", ".join(str(p) for p in written + [out / "audit.json"]))
    return 0


def score_all(model, processor, data, root: Path, path: Path, records: list, args, max_length) -> tuple[float, int]:
    """Score the samples after ``records`` (appended to it and to ``path`` batch by batch)."""
    from tqdm.auto import tqdm

    start, t0 = len(records), time.perf_counter()
    pending = []
    with open(path, "a", encoding="utf-8") as f, tqdm(
            total=len(data), initial=start, unit="sample", desc="calplug audit", file=sys.stderr,
            disable=True if args.no_progress else None, dynamic_ncols=True, mininterval=1.0) as bar:
        for rec in auditing.audit(model, data.records, processor=processor, batch_size=args.batch_size,
                                  score=args.score, contrast=args.contrast, image_folder=root,
                                  max_length=max_length, lowest=5, start=start):
            pending.append(rec)
            if len(pending) == args.batch_size or rec["index"] == len(data) - 1:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pending))
                f.flush()
                records += pending
                bar.update(len(pending))
                pending = []
        if pending:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pending))
            records += pending
    return time.perf_counter() - t0, len(records) - start


def write_report(model, processor, data, root: Path, out: Path, records, summary, header, args, rule, max_length) -> list[Path]:
    """scores.png, and report.html with the lowest samples rescored token by token."""
    scores = [r["score"] for r in records if r["score"] is not None]
    threshold = None
    if rule and scores:
        kept = set(auditing.select(records, **rule))
        threshold = min((r["score"] for r in records if r["score"] is not None and r["index"] in kept), default=None)
    audit_report.plot_histogram(scores, out / "scores.png",
                                f"calplug audit: {len(scores)} scored samples of {data.path.name}", threshold)
    order = sorted((r for r in records if r["score"] is not None), key=lambda r: (r["score"], r["index"]))
    shown = [r["index"] for r in order[:args.report_samples]]
    again = {r["index"]: r for r in auditing.audit(
        model, data.records, processor=processor, batch_size=args.batch_size, score=args.score,
        contrast=args.contrast, image_folder=root, max_length=max_length, indices=shown, tokens=True)}
    tokenizer = getattr(processor, "tokenizer", processor)
    rows = []
    for rank, index in enumerate(shown, start=1):
        conv = data_files.conversation(data.records[index])
        rows.append(dict(rank=rank, record=records[index], images=data_files.load_images(conv.images, root),
                         tokens=audit_report.token_rows(again[index], tokenizer) if "token_ids" in again[index] else []))
    (out / "report.html").write_text(audit_report.render_html(rows, summary, header, args.score), encoding="utf-8")
    return [out / "report.html", out / "scores.png"]
