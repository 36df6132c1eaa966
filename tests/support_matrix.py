"""Write docs/support-matrix.md from the tox envs' junit results: every image-text-to-text class
of each transformers release the matrix ran, as proven (the releases where its family's whole
property set passed), refused (why) or matched but unproven; and the family x release test counts.

    tox                                   # every env writes .tox/results/<env>.xml, then the
                                          # support-matrix env runs this script
    python tests/support_matrix.py .tox/results docs/support-matrix.md   # by hand

Each env records, as junit testsuite properties, the transformers version it ran
(``transformers``), the hash of the source that ran and the env (tests/_results.py: results of
other source, or of another env, are left out) and, from tests/test_family_support.py, the
classes of that release's mapping with calplug's status for each and the family keys of
calplug's table (``calplug_support``, JSON).

"Proven on a release" (`proof`) means, from that release's results: no test of the family
failed, and its property cases (ids ``hf-<family>-<modality>-<padding>`` of
tests/test_properties.py) passed every property of `PROPERTIES`; each faithful case at every
setting of `SETTINGS` (read from the test id); a property skipped only where `NOT_APPLICABLE`
says it does not apply (drop = mask where calplug refuses mask); and ``calplug verify`` passed
on the family (tests/test_verify.py). A case whose every property skipped (its modality breaks
on that release) is noted, not counted. Test counts come from the family tests (the modules in
`MODULES`). Standard library only.
"""
from __future__ import annotations

import json
import pathlib
import re
import sys

import _results

MODULES = ("tests.test_family_calls", "tests.test_family_decoders", "tests.test_family_support",
           "tests.test_properties", "tests.test_kinds",
           "tests.test_verify")
CASES_MODULE = "tests.test_properties"
# What "proven" requires: each property test of tests/test_properties.py (what it shows) ...
PROPERTIES = {
    "test_faithful_mode_equals_reference": "faithful = reference (loss, gaps, weights, gradients)",
    "test_unit_weights_give_the_models_own_loss_and_text_only_samples_weigh_alpha":
        "unit weights = the model's own loss",
    "test_drop_equals_mask_on_text_rows": "drop = mask on text rows",
    "test_disable_restores_bit_identical_outputs_and_state_dict": "disable restores",
    "test_eval_and_calls_without_labels_return_what_the_original_returns": "eval untouched",
    "test_generate_is_unchanged": "generate() untouched",
}
FAITHFUL = "test_faithful_mode_equals_reference"
# ... the faithful test at each of these settings (alpha, beta, window of its id) ...
SETTINGS = {"alpha 0 with pooling": lambda alpha, beta, window: alpha == 0 and window > 1,
            "alpha 1 with pooling": lambda alpha, beta, window: alpha == 1 and window > 1}
# ... skipped only where the skip says the property does not apply to the family ...
NOT_APPLICABLE = {"test_drop_equals_mask_on_text_rows": (
    "calplug refuses contrast='mask'",                      # conv / linear-attention decoders
    "the image is not at positions of the decoder sequence",  # cross-attention, encoder-decoder
)}
# ... and calplug verify passing on the family (the placeholder families' test, the kinds').
VERIFY = {("tests.test_verify", "test_verify_passes_on_every_family"),
          ("tests.test_kinds", "test_verify_passes_on_every_kind")}
CASE_ID = re.compile(r"\[(hf-(\w+?)-(?:image|video)-(?:right|left))(?:-([^\]]*))?\]")
SETTING_ID = re.compile(r"a([0-9.e+-]+)-b([0-9.e+-]+)-w(\d+)")
NOT_IN_VERSION = re.compile(r"needs transformers >= ")
LABEL = {"proven": "proven", "refused": "refused", "matched": "matched, unproven"}
TALLY = {"proven": "proven", "refused": "refused", "matched": "matched but unproven",
         "FAIL": "failing their family's tests",
         "unproven": "whose family's property set did not pass whole"}


def family_of(test_name: str, module: str, keys) -> str | None:
    """The family key a test belongs to: ``hf-<key>-`` case ids, else a parameter or a part of the
    test's name that is a key (the longest that fits)."""
    if module == CASES_MODULE:  # case ids: hf-<family>-<modality>-<padding>[-settings]
        case = CASE_ID.search(test_name)
        return case.group(2) if case and case.group(2) in keys else None
    tokens = re.split(r"[\[\]\-]", test_name)
    for token in tokens[1:]:
        if token in keys:
            return token
    for key in sorted(keys, key=len, reverse=True):
        if f"_{key}_" in f"_{tokens[0]}_":
            return key
    return None


def read(path: pathlib.Path, root) -> dict:
    """One env's results (``root``: its parsed junit XML): ``env``, ``version``, ``seconds``
    (pytest, whole env), ``support`` (the recorded ``calplug_support``, or None) and ``counts``
    ({family key: {"passed": n, "failed": n, "skipped": [message, ...], "cases": {case id:
    {property test: [outcome, ...]}}, "settings": {case id: [(alpha, beta, window), ...]},
    "verify": [outcome, ...]}}); an outcome is "passed", "failed" or the skip message."""
    props = _results.properties(root)
    version = props.get("transformers", "?")
    support = json.loads(props["calplug_support"]) if "calplug_support" in props else None
    seconds = sum(float(suite.get("time", 0)) for suite in root.iter("testsuite"))
    keys = set(support["families"]) if support else set()
    counts: dict = {}
    for case in root.iter("testcase"):
        module, name = case.get("classname"), case.get("name", "")
        if module not in MODULES:
            continue
        family = family_of(name, module, keys)
        if family is None:
            continue
        c = counts.setdefault(family, {"passed": 0, "failed": 0, "skipped": [], "cases": {},
                                       "settings": {}, "verify": []})
        if case.find("failure") is not None or case.find("error") is not None:
            c["failed"] += 1
            outcome = "failed"
        elif case.find("skipped") is not None:
            outcome = case.find("skipped").get("message", "")
            c["skipped"].append(outcome)
        else:
            c["passed"] += 1
            outcome = "passed"
        test = name.split("[")[0]
        if module == CASES_MODULE:
            match = CASE_ID.search(name)
            c["cases"].setdefault(match.group(1), {}).setdefault(test, []).append(outcome)
            if test == FAITHFUL and outcome == "passed":
                c["settings"][match.group(1)] = [
                    (float(a), float(b), int(w)) for a, b, w in SETTING_ID.findall(match.group(3) or "")]
        elif (module, test) in VERIFY:
            c["verify"].append(outcome)
    return dict(env=path.stem, version=version, seconds=seconds, support=support, counts=counts)


def version_key(version: str):
    return tuple(int(x) if x.isdigit() else 0 for x in re.split(r"[.+]", version)[:3])


def ran(count: dict | None) -> bool:
    """Whether a family's tests ran in an env (not absent, not all skipped)."""
    return count is not None and count["passed"] + count["failed"] > 0


def not_applicable(test: str, outcome: str) -> bool:
    return any(why in outcome for why in NOT_APPLICABLE.get(test, ()))


def proof(count: dict | None) -> list[str]:
    """What keeps an env's results from proving a family (empty: proven there): see the module
    docstring. Only cases that ran (some property passed) count; a case skipped whole is noted
    by the caller through its skip messages."""
    if count is None or not ran(count):
        return ["its tests did not run"]
    if count["failed"]:
        return [f"{count['failed']} of its tests failed"]
    cases = {case: tests for case, tests in count["cases"].items()
             if any(o == "passed" for outcomes in tests.values() for o in outcomes)}
    if not cases:
        return ["its property cases did not run"]
    missing = []
    for test, what in PROPERTIES.items():
        outcomes = [o for tests in cases.values() for o in tests.get(test, [])]
        skipped = sorted({o for o in outcomes if o != "passed" and not not_applicable(test, o)})
        if skipped:
            missing.append(f"{what}: skipped ({'; '.join(skipped)})")
        elif not outcomes:
            missing.append(f"{what}: did not run")
    for label, wanted in SETTINGS.items():
        short = [case for case in cases if FAITHFUL in cases[case]
                 and not any(wanted(*s) for s in count["settings"].get(case, []))]
        if short:
            missing.append(f"faithful at {label}: not run on {', '.join(sorted(short))}")
    if "passed" not in count["verify"]:
        missing.append("calplug verify: " + ("skipped" if count["verify"] else "did not run"))
    return missing


def proven_in(count: dict | None) -> bool:
    """Whether an env's results prove a family (`proof` finds nothing missing)."""
    return not proof(count)


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
        partial = [f"{v} ({'; '.join(proof(c))})" for v, c in counts
                   if ran(c) and not c["failed"] and not proven_in(c)]
        skipped = sorted({m for v, c in counts if c is not None and not ran(c)
                          for m in c["skipped"] if not NOT_IN_VERSION.search(m)})
        text = (f"family `{key}`: its whole property set passes on {', '.join(passed)}" if passed
                else f"family `{key}`")
        if failing:
            text += "; FAIL on " + ", ".join(failing)
        if partial:
            text += "; not proven on " + ", ".join(partial)
        if skipped:
            text += "; its tests skip where " + " ".join(note(m) for m in skipped)
        if failing:
            return "FAIL", "FAIL", text, passed
        if not passed:
            return "unproven", "unproven: " + ("its property set did not pass whole" if partial
                                               else "its cases did not run"), text, passed
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
        "  cross-attention, encoder-decoder, Kosmos or image-prefix one: docs/transformers.md) and, on each",
        "  of those releases, in one run of the current source, no test of its family failed and its whole",
        "  property set passed: faithful mode = the two-forward reference in loss, gaps, weights and every",
        "  gradient at alpha 0 and at alpha 1 with pooling, unit weights = the model's own loss, drop =",
        "  mask on text rows (where calplug allows mask and the image has positions), disable, eval and",
        "  `generate()` untouched (tests/test_properties.py), and `calplug verify` passes",
        "  (tests/test_verify.py, tests/test_kinds.py). The rule is `proof` in tests/support_matrix.py.",
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
    for name, _, status, text, passed in rows:
        # a release whose mapping lacks the class but whose family tests proved it there (the
        # class existed under another auto mapping, e.g. Idefics 1 and UDOP on 4.45) has it too
        releases = sorted(set(classes[name]["releases"]) | set(passed), key=version_key)
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
            # not in this release: every test skipped and some skip says the class needs a later
            # release (others may skip first for reasons that hold on every release)
            if c is None or (c["passed"] == 0 and c["failed"] == 0 and c["skipped"]
                             and any(NOT_IN_VERSION.search(m) for m in c["skipped"])):
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
    kept, ignored = _results.current(results_dir.glob("*.xml"))
    for line in ignored:
        print(f"left out {line}")
    results = [r for r in (read(path, root) for path, root in kept) if r["support"] is not None]
    if not results:
        print(f"no class list (testsuite property calplug_support, tests/test_family_support.py) in "
              f"{results_dir}/*.xml recorded from this source: run the tox envs first "
              "(tox -e py,hf-4.45,hf-4.49,hf-4.57)", file=sys.stderr)
        return 1
    output.write_text(render(results))
    print(f"wrote {output} from {', '.join(r['env'] + '.xml' for r in results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
