"""Write docs/support-matrix.md from the tox envs' junit results: every image-text-to-text class
of each transformers release the matrix ran, as proven (the releases where its family's tests
passed), refused (why) or matched but unproven; and the family x release test counts.

    tox                                   # every env writes .tox/results/<env>.xml, then the
                                          # support-matrix env runs this script
    python tests/support_matrix.py .tox/results docs/support-matrix.md   # by hand

Each env records, as junit testsuite properties, the transformers version it ran
(``transformers``) and, from tests/test_family_support.py, the classes of that release's mapping
with calplug's status for each and the family keys of calplug's table (``calplug_support``, JSON).
Test counts come from the family tests (case ids ``hf-<family>-...`` of tests/test_properties.py,
the family parameters of the other modules in `MODULES`). Standard library only.
"""
from __future__ import annotations

import json
import pathlib
import re
import sys
import xml.etree.ElementTree as ET

MODULES = ("tests.test_family_calls", "tests.test_family_decoders", "tests.test_family_support",
           "tests.test_properties", "tests.test_kinds",
           "tests.test_verify")
CASES_MODULE = "tests.test_properties"  # a family is proven on a release where its cases pass there
NOT_IN_VERSION = re.compile(r"needs transformers >= ")
LABEL = {"proven": "proven", "refused": "refused", "matched": "matched, unproven"}
TALLY = {"proven": "proven", "refused": "refused", "matched": "matched but unproven",
         "FAIL": "failing their family's tests", "unproven": "with family cases that did not run"}


def family_of(test_name: str, module: str, keys) -> str | None:
    """The family key a test belongs to: ``hf-<key>-`` case ids, else a parameter or a part of the
    test's name that is a key (the longest that fits)."""
    if module == "tests.test_properties":  # case ids: hf-<family>-<modality>-<padding>
        case = re.search(r"\[hf-(\w+?)-(?:image|video)", test_name)
        return case.group(1) if case and case.group(1) in keys else None
    tokens = re.split(r"[\[\]\-]", test_name)
    for token in tokens[1:]:
        if token in keys:
            return token
    for key in sorted(keys, key=len, reverse=True):
        if f"_{key}_" in f"_{tokens[0]}_":
            return key
    return None


def read(path: pathlib.Path) -> dict:
    """One env's results: ``env``, ``version``, ``seconds`` (pytest, whole env), ``support``
    (the recorded ``calplug_support``, or None) and ``counts`` ({family key: {"passed": n,
    "failed": n, "skipped": [message, ...], "cases": passed tests of `CASES_MODULE`}})."""
    root = ET.parse(path).getroot()
    version, support = "?", None
    seconds = sum(float(suite.get("time", 0)) for suite in root.iter("testsuite"))
    for prop in root.iter("property"):
        if prop.get("name") == "transformers":
            version = prop.get("value")
        elif prop.get("name") == "calplug_support":
            support = json.loads(prop.get("value"))
    keys = set(support["families"]) if support else set()
    counts: dict = {}
    for case in root.iter("testcase"):
        if case.get("classname") not in MODULES:
            continue
        family = family_of(case.get("name", ""), case.get("classname"), keys)
        if family is None:
            continue
        c = counts.setdefault(family, {"passed": 0, "failed": 0, "skipped": [], "cases": 0})
        if case.find("failure") is not None or case.find("error") is not None:
            c["failed"] += 1
        elif case.find("skipped") is not None:
            c["skipped"].append(case.find("skipped").get("message", ""))
        else:
            c["passed"] += 1
            c["cases"] += case.get("classname") == CASES_MODULE
    return dict(env=path.stem, version=version, seconds=seconds, support=support, counts=counts)


def version_key(version: str):
    return tuple(int(x) if x.isdigit() else 0 for x in re.split(r"[.+]", version)[:3])


def ran(count: dict | None) -> bool:
    """Whether a family's tests ran in an env (not absent, not all skipped)."""
    return count is not None and count["passed"] + count["failed"] > 0


def proven_in(count: dict | None) -> bool:
    """Whether an env proves a family: none of its tests failed and its property cases ran and
    passed (a refusal test passing alone proves nothing)."""
    return count is not None and not count["failed"] and count.get("cases", 0) > 0


def render(results: list[dict]) -> str:
    results = sorted(results, key=lambda r: version_key(r["version"]))
    newest = results[-1]
    notes: list[str] = []

    def note(text: str) -> str:
        if text not in notes:
            notes.append(text)
        return f"[{notes.index(text) + 1}]"

    families: dict[str, list] = {}    # key -> [display, class]; newest table last
    classes: dict[str, dict] = {}     # class -> {"status", "reason", "releases": [...], "mapped": [...]}
    for r in results:
        families.update(r["support"]["families"])
        for name, (status, reason, mapped) in r["support"]["classes"].items():
            entry = classes.setdefault(name, {"releases": [], "mapped": []})
            entry.update(status=status, reason=reason)  # the newest release's word counts
            entry["releases"].append(r["version"])
            if mapped:
                entry["mapped"].append(r["version"])
    key_of = {cls: key for key, (_, cls) in families.items()}

    def evidence(name: str) -> tuple[str, str, str, list[str]]:
        """(kind: a key of `TALLY`, status cell, evidence cell, releases where its family's tests
        passed) of a class, from the newest release's status and the test results."""
        entry = classes[name]
        if entry["status"] != "proven":
            return entry["status"], LABEL[entry["status"]], entry["reason"], []
        key = key_of.get(name)
        counts = [(r["version"], r["counts"].get(key)) for r in results]
        passed = [v for v, c in counts if proven_in(c)]
        failing = [f"{v} ({c['failed']} of {c['passed'] + c['failed']} failed)" for v, c in counts
                   if ran(c) and c["failed"]]
        skipped = sorted({m for v, c in counts if c is not None and not proven_in(c) and not c["failed"]
                          for m in c["skipped"] if not NOT_IN_VERSION.search(m)})
        text = f"family `{key}`: its cases pass on {', '.join(passed)}" if passed else f"family `{key}`"
        if failing:
            text += "; FAIL on " + ", ".join(failing)
        if skipped:
            text += "; its tests skip where " + " ".join(note(m) for m in skipped)
        if failing:
            return "FAIL", "FAIL", text, passed
        if not passed:
            return "unproven", "unproven: its cases did not run", text, passed
        return "proven", f"proven ({', '.join(passed)})", text, passed

    rows = [(name, *evidence(name)) for name in sorted(classes, key=str.lower)]
    in_newest = {n for n in classes if newest["version"] in classes[n]["releases"]}
    tally: dict[str, int] = {}
    for name, kind, _, _, _ in rows:
        if name in in_newest:
            tally[kind] = tally.get(kind, 0) + 1
    proven_newest = sorted({key_of[n] for n, kind, _, _, passed in rows
                            if n in in_newest and kind == "proven" and newest["version"] in passed})
    mapping = newest["support"]["mapping"]

    lines = [
        "# Support matrix: every image-text-to-text class x transformers versions",
        "",
        "Generated by `tests/support_matrix.py` from the junit results of the tox envs (do not edit",
        "by hand). Regenerate with `tox` (all envs, then the `support-matrix` env), or after running",
        "some envs: `tox -e py,hf-4.45,hf-4.49,hf-4.57,support-matrix`.",
        "",
        "## Every class",
        "",
        "Every class of transformers' image-text-to-text auto-model mapping in each release the",
        f"matrix ran (`{mapping}`; releases before it list their",
        "vision-to-sequence mapping) and every class of calplug's family table, with its status:",
        "",
        "* **proven (releases)**: an integration of calplug handles it (the placeholder-token one, or the",
        "  cross-attention, encoder-decoder or Kosmos one: docs/transformers.md) and its family's",
        "  tests passed on those releases of the matrix (faithful mode = the two-forward reference in",
        "  loss and gradients, drop = mask on text rows, unit weights = the model's own loss, disable,",
        "  eval and `generate()` untouched, `calplug verify` passes; tests/test_properties.py,",
        "  tests/test_family_calls.py, tests/test_family_decoders.py, tests/test_verify.py).",
        "* **refused**: `calplug.enable` raises `UnsupportedModelError` with the reason shown.",
        "* **matched, unproven**: `calplug.enable` accepts it with a one-time warning; no test of",
        "  calplug proves it. Check it on your model with `calplug verify` (docs/verify.md).",
        "",
        f"transformers {newest['version']}: {len(in_newest)} classes: "
        + ", ".join(f"{tally[w]} {TALLY[w]}" for w in TALLY if w in tally)
        + f"; {len(proven_newest)} families proven on {newest['version']}.",
        "",
        "| class | status | releases that have it | evidence / reason |",
        "|---|---|---|---|",
    ]
    for name, _, status, text, _ in rows:
        releases = classes[name]["releases"]
        have = "all" if len(releases) == len(results) else ", ".join(releases)
        lines.append(f"| `{name}` | {status} | {have} | {text} |")

    lines += [
        "",
        "## Family tests per release",
        "",
        "A cell counts the tests of that family in that env; `-` = the family is not in that release.",
        "",
        "| family | class | " + " | ".join(f"{r['version']} (`{r['env']}`)" for r in results) + " |",
        "|---|---|" + "---|" * len(results),
    ]
    for key, (display, cls) in families.items():
        cells = []
        for r in results:
            c = r["counts"].get(key)
            if c is None or (c["passed"] == 0 and c["failed"] == 0 and c["skipped"]
                             and all(NOT_IN_VERSION.search(m) for m in c["skipped"])):
                cells.append("-")
                continue
            total = c["passed"] + c["failed"] + len(c["skipped"])
            cell = f"FAIL {c['failed']}/{total}" if c["failed"] else f"pass {c['passed']}/{total}"
            skips = sorted(set(c["skipped"]))
            if skips:
                cell += f", {len(c['skipped'])} skipped " + " ".join(note(m) for m in skips)
            cells.append(cell)
        lines.append(f"| {display} | `{cls}` | " + " | ".join(cells) + " |")
    lines.append("| pytest seconds (whole env) | | "
                 + " | ".join(f"{r['seconds']:.1f}" for r in results) + " |")
    if notes:
        lines += ["", "Skipped tests:", ""]
        lines += [f"{i}. {text}" for i, text in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python tests/support_matrix.py RESULTS_DIR OUTPUT.md", file=sys.stderr)
        return 2
    results_dir, output = pathlib.Path(argv[0]), pathlib.Path(argv[1])
    files = sorted(results_dir.glob("*.xml"))
    results = [r for r in map(read, files) if r["support"] is not None]
    if not results:
        print(f"no class list (testsuite property calplug_support, tests/test_family_support.py) in "
              f"{results_dir}/*.xml: run the tox envs first (tox -e py,hf-4.45,hf-4.49,hf-4.57)",
              file=sys.stderr)
        return 1
    output.write_text(render(results))
    print(f"wrote {output} from {', '.join(r['env'] + '.xml' for r in results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
