"""The data files vision-language fine-tuning reads, read and written back unchanged:

* **LLaVA JSON**: a list of samples with ``id``, ``image`` (a path or a list of paths) and
  ``conversations``, turns ``{"from": "human" | "gpt" | "system", "value": ...}`` with
  ``<image>`` in the text where the image goes;
* **ShareGPT-style ``messages``** (LLaMA-Factory, ms-swift): ``{"messages": [{"role": "user" |
  "assistant" | "system", "content": ...}], "images": [...]}``, optionally a ``system`` string;
* the same records as **JSON Lines** (one object a line).

`read` keeps every record as it was, so a filtered copy (`write`) is the same file minus the
samples left out, in its own format. `conversation` turns one record into roles and text, and a
record that cannot be read into one raises `CALSampleError` for that record alone: a bad sample
never stops a run over a dataset.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .errors import CALConfigError, CALSampleError
from .processing import IMAGE

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "model": "assistant", "system": "system"}


@dataclasses.dataclass
class DataFile:
    """A data file's records, as read (``lines``: JSON Lines, else one JSON list). A JSON Lines
    line that is not valid JSON is kept as an `Unreadable` record, reported for that sample."""
    path: Path
    records: list
    lines: bool

    def __len__(self) -> int:
        return len(self.records)


@dataclasses.dataclass
class Unreadable:
    line: int
    error: str


@dataclasses.dataclass
class Conversation:
    """One sample: its own id (else None), messages ``{"role", "content"}`` with ``<image>``
    placeholders, and the image entries in placeholder order (paths as the file gives them)."""
    id: object
    messages: list
    images: list


def read(path) -> DataFile:
    """Every record of a LLaVA / ShareGPT JSON list or JSON Lines file. Raises `CALConfigError`
    for a file that is neither (a bad ``--data``)."""
    path = Path(path)
    if not path.is_file():
        raise CALConfigError(f"--data {str(path)!r} is not a file: pass a LLaVA JSON, ShareGPT-style "
                             "JSON or JSON Lines file")
    text = path.read_text(encoding="utf-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if isinstance(value, list):
        return DataFile(path, value, lines=False)
    if isinstance(value, dict) and not _is_record(value):
        raise CALConfigError(f"--data {str(path)!r} holds one JSON object, not a list of samples: "
                             "a JSON file must be a list of samples (or use JSON Lines, one a line)")
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            records.append(Unreadable(number, str(error)))
    if not records or all(isinstance(r, Unreadable) for r in records):
        raise CALConfigError(f"--data {str(path)!r} is neither a JSON list of samples nor JSON Lines "
                             "(no line parses as JSON): pass a LLaVA JSON, ShareGPT-style JSON or JSON Lines file")
    return DataFile(path, records, lines=True)


def _is_record(value: dict) -> bool:
    return "conversations" in value or "messages" in value


def write(data: DataFile, indices, path) -> Path:
    """The records at ``indices`` (in file order), written to ``path`` in ``data``'s format."""
    path = Path(path)
    keep = [data.records[i] for i in sorted(indices)]
    if any(isinstance(r, Unreadable) for r in keep):
        raise CALConfigError("an unreadable JSON line cannot be written back")
    if data.lines:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep), encoding="utf-8")
    else:
        path.write_text(json.dumps(keep, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path


def conversation(record) -> Conversation:
    """One record as a `Conversation`; `CALSampleError` (reason ``"format"``) if it is not one."""
    if isinstance(record, Unreadable):
        raise CALSampleError("format", f"line {record.line} is not valid JSON ({record.error})")
    if not isinstance(record, dict):
        raise CALSampleError("format", f"a sample must be a JSON object, got {type(record).__name__}")
    turns, role_key, text_key = None, None, None
    if isinstance(record.get("conversations"), list):
        turns, role_key, text_key = record["conversations"], "from", "value"
    elif isinstance(record.get("messages"), list):
        turns, role_key, text_key = record["messages"], "role", "content"
    if turns is None:
        raise CALSampleError("format", "the sample has neither `conversations` (LLaVA) nor `messages` (ShareGPT) as a list")
    messages = []
    if isinstance(record.get("system"), str) and record["system"]:
        messages.append(dict(role="system", content=record["system"]))
    for turn in turns:
        if not isinstance(turn, dict):
            raise CALSampleError("format", f"a turn must be an object with {role_key!r} and {text_key!r}")
        # LLaVA's `from`/`value` and ShareGPT's `role`/`content`, whichever the turn uses
        role = turn.get(role_key, turn.get("role", turn.get("from")))
        text = turn.get(text_key, turn.get("content", turn.get("value")))
        if ROLES.get(role) is None:
            raise CALSampleError("format", f"unknown role {role!r}: use one of {sorted(ROLES)}")
        if not isinstance(text, str):
            raise CALSampleError("format", f"the text of a {role!r} turn must be a string, got {type(text).__name__}")
        messages.append(dict(role=ROLES[role], content=text))
    if record.get("video") or record.get("videos"):
        raise CALSampleError("video", "the sample has a video: the audit scores images only")
    entries = record.get("image", record.get("images"))
    images = [] if entries is None else [entries] if isinstance(entries, (str, dict)) else entries
    if not isinstance(images, list):
        raise CALSampleError("format", f"`image` / `images` must be a path or a list, got {type(images).__name__}")
    placed = sum(m["content"].count(IMAGE) for m in messages)
    if any(IMAGE in m["content"] for m in messages if m["role"] == "assistant"):
        raise CALSampleError("format", f"an assistant turn holds {IMAGE}: images go in user turns")
    if images and placed == 0:  # no placeholder: the images go before the first user text
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            raise CALSampleError("format", "the sample has images but no user turn to put them in")
        first["content"] = IMAGE * len(images) + "\n" + first["content"]
    elif placed != len(images):
        raise CALSampleError("format", f"{placed} {IMAGE} placeholders in the text but {len(images)} images")
    ident = record.get("id")
    return Conversation(ident if isinstance(ident, (str, int)) else None, messages, images)


def image_path(entry, root: Path) -> Path:
    """Where an image entry (a path, or ``{"path": ...}``) lies: absolute, or under ``root``."""
    if isinstance(entry, dict):
        entry = entry.get("path")
    if not isinstance(entry, str) or not entry:
        raise CALSampleError("format", f"an image entry must be a file path, got {entry!r}")
    if entry.startswith(("http://", "https://", "data:")):
        raise CALSampleError("format", f"image {entry[:60]!r} is not a local file: the audit reads image files")
    path = Path(entry)
    return path if path.is_absolute() else Path(root) / path


def load_images(entries: list, root: Path) -> list:
    """The sample's images as RGB PIL images; `CALSampleError` for a missing or unreadable one."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for entry in entries:
        path = image_path(entry, root)
        if not path.is_file():
            raise CALSampleError("missing-image", f"image not found: {str(path)!r}")
        try:
            with Image.open(path) as im:
                out.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise CALSampleError("unreadable-image", f"image {str(path)!r} cannot be read "
                                                     f"({' '.join(str(error).split())[:160]})") from error
    return out
