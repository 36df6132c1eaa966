"""Which junit results describe the code of this checkout (standard library only).

Every pytest session records, as testsuite properties of its junit XML (tests/conftest.py),
``calplug_source``: a hash of the files that decide what the tests do (the library, the
integrations, the patches, the tests, tox.ini, pyproject.toml), and ``calplug_env``: the tox env
that ran it. The readers of ``.tox/results`` (tests/support_matrix.py, tests/skip_report.py) keep
only the files whose hash is the checkout's own and whose env is the file's name: results of
older code, or a file copied under another env's name, can prove nothing. The readers
themselves are left out of the hash, so a reader can be fixed without re-running the matrix.
"""
from __future__ import annotations

import hashlib
import pathlib
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = ("calplug", "integrations", "patches", "tests", "tox.ini", "pyproject.toml", "toxfile.py")
READERS = {"tests/_results.py", "tests/support_matrix.py", "tests/skip_report.py"}


def source_hash(root: pathlib.Path = ROOT) -> str:
    """sha256 (first 16 hex digits) over the path and bytes of every file of `SOURCES` under
    ``root``, caches and the readers left out."""
    digest = hashlib.sha256()
    files = []
    for name in SOURCES:
        path = root / name
        files += [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []
    for path in sorted(files):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or "__pycache__" in path.parts or rel in READERS or path.suffix == ".pyc":
            continue
        digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def properties(root_element) -> dict[str, str]:
    """The testsuite properties of a parsed junit XML (the last value of each name)."""
    out = {}
    for suite in root_element.iter("testsuite"):
        props = suite.find("properties")
        for prop in props if props is not None else ():
            out[prop.get("name")] = prop.get("value")
    return out


def current(paths, root: pathlib.Path = ROOT) -> tuple[list[tuple[pathlib.Path, ET.Element]], list[str]]:
    """``(kept, ignored)``: the parsed XMLs among ``paths`` recorded from this checkout's source by
    the env they are named after, and one line per other file saying why it was left out."""
    want = source_hash(root)
    kept, ignored = [], []
    for path in sorted(paths):
        element = ET.parse(path).getroot()
        props = properties(element)
        source, env = props.get("calplug_source"), props.get("calplug_env")
        if source != want:
            ignored.append(f"{path.name}: recorded from other source ({source or 'no stamp'}; "
                           f"this checkout is {want}): re-run that env")
        elif env != path.stem:
            ignored.append(f"{path.name}: recorded by env {env!r}, not {path.stem!r}")
        else:
            kept.append((path, element))
    return kept, ignored
