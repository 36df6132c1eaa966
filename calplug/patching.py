"""The patch engine behind ``calplug patch``: reading, checking, applying and undoing the patch
files that turn on CAL in forks of LLaVA-style training code (``patches/``, docs/patches.md).

A library module, so that scripts and tests use the engine without the command: `available`,
`resolve`, `check`, `ensure_applies`, `require_writable`, `apply`. It imports only the standard
library and calplug's errors.

A patch file is a plain git diff under a ``Key: value`` header that names the upstream commit it
was made against (``git apply`` skips the header). Applying is all or nothing: ``git apply
--check`` runs first, and when the checkout has drifted from that commit the refusal names each
hunk that no longer fits and the lines that differ; nothing is written. Without git on PATH the
same checks and edits run in Python (exact context, any offset: what ``git apply`` accepts).

Safety, before anything is read or written: every file a patch names must lie inside PATH (no
absolute path, no ``..`` component, no symbolic link on the way, as ``git apply`` requires), and
every file to be edited must be writable. A write that still fails (a full disk) puts back the
files already written and leaves the others untouched; the error is one line.

The files ship inside the package as ``calplug.patches`` (pyproject maps the repository's
``patches/`` folder there); in a source checkout or editable install they are read from
``patches/`` next to ``calplug/``.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path, PurePosixPath, PureWindowsPath

from .config import did_you_mean
from .errors import CALError

SUFFIX = ".patch"


class PatchError(CALError):
    """A patch cannot be found, read or applied (the message says why and what to do)."""


class PatchConflictError(PatchError):
    """The checkout has drifted from the commit the patch was made against; nothing was changed."""


# -- finding and reading patch files --------------------------------------------------------------
def patch_dir() -> Path:
    """The folder holding the shipped ``*.patch`` files."""
    spec = importlib.util.find_spec("calplug.patches")
    candidates = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) for p in spec.submodule_search_locations]
    candidates.append(Path(__file__).resolve().parents[1] / "patches")  # source / editable
    for folder in candidates:
        if folder.is_dir() and any(folder.glob("*" + SUFFIX)):
            return folder
    raise PatchError(
        "calplug's patch files are missing (looked in "
        + ", ".join(str(c) for c in candidates)
        + "). Reinstall calplug (`pip install --force-reinstall calplug`), or use the files in "
        "the patches/ folder of the calplug repository."
    )


@dataclasses.dataclass
class Hunk:
    old_start: int          # 1-based first line of the preimage in the file the patch was made on
    new_start: int
    old: list[str]          # context and removed lines, without the leading marker
    new: list[str]          # context and added lines

    def pre(self, reverse: bool) -> list[str]:
        return self.new if reverse else self.old

    def post(self, reverse: bool) -> list[str]:
        return self.old if reverse else self.new

    def start(self, reverse: bool) -> int:
        return self.new_start if reverse else self.old_start


@dataclasses.dataclass
class FileDiff:
    path: str               # relative path inside the checkout
    hunks: list[Hunk]
    no_newline_at_end: bool = False


@dataclasses.dataclass
class PatchFile:
    name: str
    path: Path
    header: dict[str, str]
    files: list[FileDiff]

    @property
    def text(self) -> str:
        return self.path.read_text()

    @property
    def added(self) -> int:
        return sum(len(h.new) - len(h.old) for f in self.files for h in f.hunks)

    def summary(self) -> str:
        commit = self.header.get("Commit", "?")[:7]
        return f"{self.name:<20} {upstream(self)} @ {commit}  ({', '.join(f.path for f in self.files)})"


_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def read_patch(path: str | os.PathLike) -> PatchFile:
    """Parse a patch file: its ``Key: value`` header and its unified diff."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise PatchError(f"cannot read patch file {str(path)!r}: {exc}") from None
    header: dict[str, str] = {}
    files: list[FileDiff] = []
    i = 0
    while i < len(lines) and not lines[i].startswith("diff --git "):
        key, sep, value = lines[i].partition(": ")
        if sep and re.fullmatch(r"[A-Z][A-Za-z-]*", key):
            header[key] = value.strip()
        i += 1
    current: FileDiff | None = None
    while i < len(lines):
        line = lines[i]
        if line.startswith("+++ "):
            target = line[4:].split("\t")[0]
            current = FileDiff(target[2:] if target.startswith("b/") else target, [])
            files.append(current)
        elif line.startswith("@@"):
            m = _HUNK.match(line)
            if m is None or current is None:
                raise PatchError(f"{path}: line {i + 1} is not a valid hunk header: {line!r}")
            old_n = int(m.group(2) or 1)
            new_n = int(m.group(4) or 1)
            hunk = Hunk(int(m.group(1)), int(m.group(3)), [], [])
            i += 1
            while i < len(lines) and (len(hunk.old) < old_n or len(hunk.new) < new_n):
                body = lines[i]
                mark, text = (body[:1], body[1:]) if body else (" ", "")
                if mark in " -":
                    hunk.old.append(text)
                if mark in " +":
                    hunk.new.append(text)
                if mark not in " -+\\":
                    raise PatchError(f"{path}: line {i + 1}: hunk is shorter than its header says")
                i += 1
            if i < len(lines) and lines[i].startswith("\\"):
                current.no_newline_at_end = True
                i += 1
            current.hunks.append(hunk)
            continue
        i += 1
    if not files:
        raise PatchError(f"{path} holds no diff (expected `diff --git` sections after the header)")
    stem = path.name[: -len(SUFFIX)] if path.name.endswith(SUFFIX) else path.name
    return PatchFile(header.get("Name") or stem, path, header, files)


def available() -> list[PatchFile]:
    return [read_patch(p) for p in sorted(patch_dir().glob("*" + SUFFIX))]


def resolve(name: str) -> PatchFile:
    """A shipped patch by name (or unique prefix, e.g. ``mgm``), or a path to a ``.patch`` file."""
    if name.endswith(SUFFIX) and Path(name).is_file():
        return read_patch(name)
    patches = available()
    by_name = {p.name: p for p in patches}
    if name in by_name:
        return by_name[name]
    prefixed = [p for p in patches if p.name.startswith(name)]
    if len(prefixed) == 1:
        return prefixed[0]
    names = sorted(by_name)
    which = "matches several patches" if prefixed else "is not a calplug patch"
    raise PatchError(f"{name!r} {which}.{did_you_mean(name, names)} Available: {', '.join(names)} (`calplug patch list`).")


# -- checking -------------------------------------------------------------------------------------
@dataclasses.dataclass
class Conflict:
    path: str
    hunk: int               # 1-based
    hunks: int
    expected_near: int      # 1-based line where the patch expects the hunk
    details: list[str]      # "line N: ..." descriptions of the differing lines

    def describe(self) -> str:
        if not self.hunk:   # reported by git only
            return "\n".join("  " + d for d in self.details)
        head = (f"  {self.path}, hunk {self.hunk} of {self.hunks}: the lines the patch expects near "
                f"line {self.expected_near} are not in the file")
        return "\n".join([head, *("    " + d for d in self.details)])


@dataclasses.dataclass
class CheckResult:
    ok: bool
    conflicts: list[Conflict]
    missing: list[str]      # files the patch edits that PATH lacks
    git_output: str = ""
    state: str = ""         # "applies", "applied", "drifted", "missing"


def _split(text: str) -> list[str]:
    """Lines split on "\n" only, so a CRLF file keeps its "\r" and does not match (as in git)."""
    lines = text.split("\n")
    return lines[:-1] if text.endswith("\n") else lines


def _read_lines(path: Path) -> list[str]:
    return _split(path.read_bytes().decode("utf-8", errors="surrogateescape"))


def _find(lines: list[str], block: list[str], near: int) -> int | None:
    """0-based index of ``block`` in ``lines``, the occurrence nearest ``near``; None if absent."""
    if not block:
        return max(0, min(near, len(lines)))
    first = block[0]
    hits = [i for i, line in enumerate(lines[: len(lines) - len(block) + 1])
            if line == first and lines[i:i + len(block)] == block]
    return min(hits, key=lambda i: abs(i - near)) if hits else None


def _explain(lines: list[str], block: list[str], near: int) -> list[str]:
    """Which lines of the file differ from what the hunk expects, around the best alignment."""
    if not block:
        return ["the hunk expects an empty file"]
    lo, hi = max(0, near - 60), min(len(lines), near + len(block) + 60)
    best, best_score, best_blocks = near, 0, []
    for off in range(lo, max(lo + 1, hi - len(block) + 1)):
        ws = max(0, off - 3)
        window = lines[ws:off + len(block) + 3]
        blocks = difflib.SequenceMatcher(a=block, b=window, autojunk=False).get_matching_blocks()[:-1]
        score = sum(b.size for b in blocks)
        if score > best_score or (score == best_score and score and abs(off - near) < abs(best - near)):
            best, best_score, best_blocks = ws, score, blocks
    if not best_blocks:
        return [f"none of the {len(block)} expected lines are within 60 lines of line {near + 1}; "
                f"the first expected line is {block[0]!r}"]
    first, last = best_blocks[0], best_blocks[-1]
    s = max(0, best + first.b - first.a)
    e = min(len(lines), best + last.b + last.size + len(block) - (last.a + last.size))
    found = lines[s:e]
    out = []
    for tag, a0, a1, b0, b1 in difflib.SequenceMatcher(a=block, b=found, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        pairs = min(a1 - a0, b1 - b0) if tag == "replace" else 0
        for k in range(pairs):
            at = f"line {s + b0 + k + 1}"
            out.append(f"{at}: expected {block[a0 + k]!r}")
            out.append(f"{' ' * len(at)}  found    {found[b0 + k]!r}")
        for k in range(a0 + pairs, a1):
            out.append(f"before line {s + b0 + pairs + 1}: missing {block[k]!r}")
        for k in range(b0 + pairs, b1):
            out.append(f"line {s + k + 1}: not in upstream {found[k]!r}")
    return out or [f"the expected lines are near line {s + 1} but not in one block"]


# -- where a patch may write ----------------------------------------------------------------------
def targets(patch: PatchFile, root: str | os.PathLike) -> list[Path]:
    """The file of each `FileDiff` of ``patch``, inside ``root``. Raises `PatchError`, before
    anything is read or written, for a path that could reach outside the tree: absolute, with a
    ``..`` component, or through a symbolic link (``git apply`` refuses all three; a link inside
    the tree is refused too, as git does, since writing through it edits another file)."""
    root = Path(root)
    top = root.resolve()
    found = []
    for fd in patch.files:
        rel = fd.path
        posix = PurePosixPath(rel)
        reason = None
        if not rel or posix.is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
            reason = "is an absolute path"
        elif ".." in posix.parts or ".." in PureWindowsPath(rel).parts:
            reason = "climbs out of the folder with a '..' component"
        path = root
        if reason is None:
            for part in posix.parts:
                path = path / part
                if path.is_symlink():
                    reason = (f"goes through the symbolic link {str(path)!r} (-> "
                              f"{os.readlink(path)!r}); calplug patch, like git apply, does not "
                              "write through symbolic links")
                    break
        if reason is None and not path.resolve().is_relative_to(top):
            reason = f"resolves to {str(path.resolve())!r}, outside it"
        if reason is not None:
            raise PatchError(
                f"refusing {patch.name}: it names the file {rel!r}, which {reason}; a patch may only "
                f"edit files inside {str(root)!r}. Nothing was changed. Check where the patch file "
                f"came from ({patch.path})")
        found.append(path)
    return found


def _writable(path: Path) -> bool:
    """A file can be replaced: the file and its folder are writable (a read-only file is refused
    even where its folder would allow replacing it: the user made it read-only)."""
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK)


def require_writable(patch: PatchFile, root: str | os.PathLike) -> None:
    """Raises `PatchError` naming every file ``patch`` edits under ``root`` that is read-only (the
    file or its folder), before anything is written. `apply` checks this itself after the
    drift check; ``calplug patch apply`` calls it first, so that a read-only checkout is named
    before anything else is looked at."""
    root = Path(root)
    locked = [p for p in dict.fromkeys(targets(patch, root)) if p.exists() and not _writable(p)]
    if locked:
        names = ", ".join(str(p.relative_to(root)) for p in locked)
        raise PatchError(
            f"cannot edit {names} in {str(root)!r}: read-only (the file or its folder). Make it "
            f"writable (chmod u+w), then run the command again. Nothing was changed.")


def _replace(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic
    rename (as git does), keeping the permission bits (``mode``, else the file's own): an
    interrupted write never leaves half a file."""
    mode = stat.S_IMODE(path.stat().st_mode) if mode is None else mode
    tmp = path.with_name(f".{path.name}.calplug-patch-tmp")
    try:
        tmp.write_bytes(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _restore(backups: dict[Path, tuple[bytes, int]]) -> list[Path]:
    """Put back each file whose bytes or permission bits differ from its backup; a file that was
    never changed is neither rewritten nor chmod-ed. Returns the files that could not be restored."""
    failed = []
    for path, (data, mode) in backups.items():
        try:
            if not path.is_file() or path.read_bytes() != data:
                _replace(path, data, mode)
            elif stat.S_IMODE(path.stat().st_mode) != mode:
                os.chmod(path, mode)
        except OSError:
            failed.append(path)
    return failed


def _check_python(patch: PatchFile, root: Path, reverse: bool) -> tuple[list[Conflict], list[str]]:
    conflicts, missing = [], []
    for fd, target in zip(patch.files, targets(patch, root)):
        if not target.is_file():
            missing.append(fd.path)
            continue
        lines = _read_lines(target)
        offset = 0
        for n, hunk in enumerate(fd.hunks, 1):
            block, near = hunk.pre(reverse), hunk.start(reverse) - 1 + offset
            at = _find(lines, block, near)
            if at is None:
                details = _explain(lines, block, near)
                if lines and all(line.endswith("\r") for line in lines[:-1]):
                    details = ["the file has Windows (CRLF) line endings and the patch has LF: convert "
                               "the file (dos2unix) or apply the patch with the same endings", *details[:1]]
                conflicts.append(Conflict(fd.path, n, len(fd.hunks), near + 1, details))
            else:
                offset = at - (hunk.start(reverse) - 1)
    return conflicts, missing


def _git() -> str | None:
    return shutil.which("git")


def _run_git(root: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # Treat PATH as the top of the tree even when it sits inside a bigger repository: inside a
    # repository git apply reads paths from the repository root and silently skips those outside
    # the current folder. The ceiling stops the search for a repository above PATH.
    env["GIT_CEILING_DIRECTORIES"] = str(root.resolve().parent)
    return subprocess.run(["git", "apply", *args], cwd=root, env=env, capture_output=True, text=True)


def check(patch: PatchFile, root: str | os.PathLike, *, reverse: bool = False) -> CheckResult:
    """Would ``patch`` (or its reverse) apply cleanly to the checkout at ``root``? Changes nothing."""
    root = Path(root)
    targets(patch, root)   # refuses paths outside the tree before anything is read
    conflicts, missing = _check_python(patch, root, reverse)
    git_output, git_ok = "", None
    if not missing and _git():
        flags = ["--check", "-v"] + (["--reverse"] if reverse else [])
        proc = _run_git(root, flags + [str(patch.path.resolve())])
        git_ok, git_output = proc.returncode == 0, (proc.stdout + proc.stderr).strip()
        if not git_ok and not conflicts:   # git saw something the Python check did not
            conflicts.append(Conflict(patch.files[0].path, 0, 0, 0, ["git apply --check refused:",
                                                                    *git_output.splitlines()]))
    ok = not missing and not conflicts and git_ok is not False
    if missing:
        state = "missing"
    elif ok:
        state = "applies"
    else:
        other_conflicts, _ = _check_python(patch, root, not reverse)
        state = "applied" if not other_conflicts else "drifted"
    return CheckResult(ok, conflicts, missing, git_output, state)


# -- applying -------------------------------------------------------------------------------------
def _apply_python(patch: PatchFile, root: Path, reverse: bool) -> None:
    """Compute every new file in memory first, then write them all or none (`_write_all`)."""
    new_texts: dict[Path, bytes] = {}
    for fd, target in zip(patch.files, targets(patch, root)):
        raw = new_texts.get(target, target.read_bytes()).decode("utf-8", errors="surrogateescape")
        ends_with_newline = raw.endswith("\n")
        lines = _split(raw)
        offset = 0
        for hunk in fd.hunks:
            block = hunk.pre(reverse)
            at = _find(lines, block, hunk.start(reverse) - 1 + offset)
            if at is None:
                raise PatchConflictError(f"{fd.path}: hunk no longer fits (run the check)")
            lines[at:at + len(block)] = hunk.post(reverse)
            offset = at - (hunk.start(reverse) - 1) + len(hunk.post(reverse)) - len(block)
        text = "\n".join(lines) + ("\n" if ends_with_newline else "")
        new_texts[target] = text.encode("utf-8", errors="surrogateescape")
    _write_all(new_texts, root)


def _write_all(new_texts: dict[Path, bytes], root: Path) -> None:
    """Write each changed file; when one write fails, put back those already written (the rest
    were never touched) and raise one `PatchError` line, without a chained traceback."""
    backups = {path: (path.read_bytes(), stat.S_IMODE(path.stat().st_mode)) for path in new_texts}
    written: dict[Path, tuple[bytes, int]] = {}
    try:
        for path, data in new_texts.items():
            if data == backups[path][0]:
                continue
            written[path] = backups[path]
            _replace(path, data)
    except OSError as error:
        failed = _restore(written)
        raise PatchError(_write_failure(error, path, root, failed)) from None
    except BaseException:
        _restore(written)
        raise


def _write_failure(error: OSError, path: Path, root: Path, failed: list[Path]) -> str:
    rel = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    what = f"could not write {rel} in {str(root)!r} ({error.strerror or error})"
    if failed:
        names = ", ".join(str(p.relative_to(root)) for p in failed)
        return (f"{what}, and could not put back {names}, which now hold the patched text: restore "
                "them from version control (git checkout -- FILE) or a backup")
    return f"{what}. Nothing was changed: fix that (disk space, permissions) and run the command again."


def ensure_applies(patch: PatchFile, root: str | os.PathLike, *, reverse: bool = False) -> CheckResult:
    """`check`, raising when ``patch`` (or its reverse) does not apply cleanly at ``root``:
    `PatchError` when ``root`` is not a folder, `PatchConflictError` naming each conflicting
    hunk and line (or the missing files, or "already applied") otherwise. Changes nothing."""
    root = Path(root)
    if not root.is_dir():
        raise PatchError(f"{str(root)!r} is not a folder: give the root of your {upstream(patch)} checkout")
    result = check(patch, root, reverse=reverse)
    if not result.ok:
        raise PatchConflictError(_refusal(patch, root, result, reverse))
    return result


def apply(patch: PatchFile, root: str | os.PathLike, *, reverse: bool = False) -> CheckResult:
    """Check, then apply ``patch`` (or undo it, ``reverse=True``) to the checkout at ``root``.

    Raises `PatchError` (nothing written) for a file outside ``root`` or a read-only file, and
    `PatchConflictError` (nothing written) when it does not fit: the message names each
    conflicting hunk and line. On any failure while writing, every file already written is
    restored and no other file is touched.
    """
    root = Path(root)
    result = ensure_applies(patch, root, reverse=reverse)
    require_writable(patch, root)
    paths = targets(patch, root)
    if not _git():
        _apply_python(patch, root, reverse)
        return result
    backups = {path: (path.read_bytes(), stat.S_IMODE(path.stat().st_mode)) for path in paths}
    try:
        flags = ["--reverse"] if reverse else []
        proc = _run_git(root, flags + [str(patch.path.resolve())])
        if proc.returncode != 0:
            output = " ".join((proc.stdout + proc.stderr).split())
            raise PatchError(f"git apply failed after a clean check ({output}); nothing was changed")
    except BaseException:
        failed = _restore(backups)
        if failed:
            names = ", ".join(str(p.relative_to(root)) for p in failed)
            raise PatchError(f"git apply failed after a clean check, and {names} could not be put "
                             "back: restore them from version control (git checkout -- FILE)") from None
        raise
    for path, (_, mode) in backups.items():   # git apply recreates files with umask permissions
        if path.is_file() and stat.S_IMODE(path.stat().st_mode) != mode:
            os.chmod(path, mode)
    return result


def upstream(patch: PatchFile) -> str:
    """The upstream repository a patch was made for, as ``owner/name`` (from its header)."""
    return patch.header.get("Upstream", "upstream").split(" ")[0].replace("https://github.com/", "")


def _refusal(patch: PatchFile, root: Path, result: CheckResult, reverse: bool) -> str:
    verb = "undo" if reverse else "apply"
    if result.missing:
        hint = ""
        for sub in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
            if all((sub / f).is_file() for f in result.missing):
                hint = f" Did you mean {str(sub)!r}?"
                break
        return (f"cannot {verb} {patch.name}: {', '.join(result.missing)} not found under {str(root)!r}. "
                f"PATH must be the root of a {upstream(patch)} checkout (the folder holding "
                f"{result.missing[0].split('/')[0]}/).{hint} Nothing was changed.")
    if result.state == "applied":
        if reverse:
            return (f"{patch.name} is not applied to {str(root)!r}: nothing to undo. "
                    "Nothing was changed.")
        return (f"{patch.name} is already applied to {str(root)!r}. Nothing was changed. "
                f"To undo it: calplug patch apply --reverse {patch.name} {root}")
    commit = patch.header.get("Commit", "")[:7] or "?"
    lines = [f"refusing to {verb} {patch.name}: {str(root)!r} has drifted from {upstream(patch)} "
             f"@ {commit}, the commit the patch was made against. Nothing was changed.",
             "Conflicts:"]
    lines += [c.describe() for c in result.conflicts]
    lines.append(
        "Fix: bring those lines back to upstream's, or apply by hand: the patch only adds the "
        "cal_* fields to TrainingArguments and one calplug.enable_for_stage(...) block before the "
        f"Trainer is built (calplug patch show {patch.name}; docs/patches.md)."
    )
    return "\n".join(lines)

