"""``calplug patch``: the command over the patch engine (`calplug.patching`, docs/patches.md).

    calplug patch list [PATH]                  the patch files (and, given PATH, their state there)
    calplug patch show NAME                    print a patch file (for ``git apply`` or review)
    calplug patch apply NAME PATH              check, then apply NAME to the checkout at PATH
    calplug patch apply --check NAME PATH      check only; change nothing
    calplug patch apply --reverse NAME PATH    undo it

Exit status: 0 done, 1 refused (the checkout has drifted, or the patch is already applied / not
applied), 2 a bad name, folder or file (read-only, outside PATH). Only the arguments and the
printed lines live here; every check and write is the engine's.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .. import patching


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    p_list = sub.add_parser("list", help="the patch files; with PATH, whether each applies there")
    p_list.add_argument("path", nargs="?", help="a fork checkout to check every patch against")
    p_show = sub.add_parser("show", help="print a patch file")
    p_show.add_argument("name")
    p_apply = sub.add_parser("apply", help="check, then apply a patch to a fork checkout")
    p_apply.add_argument("name", help="patch name (`calplug patch list`), unique prefix, or a .patch file")
    p_apply.add_argument("path", help="root of the fork checkout (a git repository or a plain folder)")
    p_apply.add_argument("--reverse", "-R", action="store_true", help="undo the patch")
    p_apply.add_argument("--check", action="store_true", help="only check; change nothing")


def run(args) -> int:
    action = getattr(args, "action", None)
    try:
        if action in (None, "list"):
            return list_patches(getattr(args, "path", None))
        if action == "show":
            patch = patching.resolve(args.name)
            print(f"# {patch.path}")
            sys.stdout.write(patch.text)
            return 0
        return apply_patch(args.name, args.path, reverse=args.reverse, check_only=args.check)
    except patching.PatchConflictError as exc:
        print(f"calplug patch: {exc}", file=sys.stderr)
        return 1
    except patching.PatchError as exc:
        print(f"calplug patch: {exc}", file=sys.stderr)
        return 2


def list_patches(path: str | None) -> int:
    patches = patching.available()
    print(f"patch files in {patching.patch_dir()}:")
    for patch in patches:
        line = "  " + patch.summary()
        if path:
            line += f"  [{patching.check(patch, path).state}]"
        print(line)
    print("apply one: calplug patch apply NAME /path/to/checkout   (undo: --reverse)")
    return 0


def apply_patch(name: str, path: str, *, reverse: bool, check_only: bool) -> int:
    patch = patching.resolve(name)
    root = Path(path)
    verb = "undo" if reverse else "apply"
    if check_only:
        patching.ensure_applies(patch, root, reverse=reverse)
        print(f"{patch.name} would {verb} cleanly to {root} ({', '.join(f.path for f in patch.files)}).")
        return 0
    # A read-only checkout is named before anything else is looked at (apply checks it again).
    patching.require_writable(patch, root)
    patching.apply(patch, root, reverse=reverse)
    files = ", ".join(f.path for f in patch.files)
    if reverse:
        print(f"undid {patch.name} in {root} ({files}): the files are back to upstream's.")
        return 0
    print(f"applied {patch.name} to {root} ({files}, {patch.added:+d} lines).")
    print("Turn CAL on with the training flags (CAL stays off without --use_cal):")
    print("  " + patch.header.get("Flags", "--use_cal True"))
    if "Stage" in patch.header:
        print("  stage: " + patch.header["Stage"])
    print(f"undo: calplug patch apply --reverse {patch.name} {root}")
    return 0
