"""Per tox env, every skipped test counted by its reason; exit status 1 on a skip `EXPECTED` does
not list for that env. Standard library only.

    tox                                           # the skip-report env runs it after the others
    python tests/skip_report.py .tox/results [ENV ...]   # by hand (default: every current env)

Why: a skip is silent in a green run. tests/_skips.py makes the skips of what an env exists to
test fail outright (``CALPLUG_REQUIRE``); this report catches the rest: a test that starts to skip
where it ran before, in any env CI runs, for any reason. Each row of `EXPECTED` says where a skip
reason is expected and why; a skip matching none fails the run, naming its env, test and reason.
Only results of this checkout's source are read (tests/_results.py).
"""
from __future__ import annotations

import collections
import fnmatch
import pathlib
import re
import sys

import _results

# (env pattern, reason pattern, why the skip is expected there). Every reason names what is
# missing or why the test does not apply.
EXPECTED = [
    # does not apply to this release or this model
    ("*", r"needs transformers >= ", "a class newer than this env's transformers"),
    ("hf-4.49", r"transformers 4\.49's LlavaOnevision cannot take videos",
     "an upstream bug of 4.49 (video only)"),
    ("*", r"calplug refuses contrast='mask' for it|mask contrasts are refused for this decoder",
     "mask is refused for decoders that ignore mask holes, by design"),
    ("*", r"in this transformers version takes no logits_to_keep|takes no mm_token_type_ids",
     "an argument this release's forward does not have"),
    ("*", r"computes no router load-balancing loss", "no router loss in this release"),
    ("py", r"PaliGemma builds its training mask from token_type_ids alone from 5\.0",
     "a 4.x-only behaviour"),
    ("hf-*", r"the tiny \w+ config does not build on this release",
     "a refusal test whose tiny config this older release cannot build"),
    ("*", r"models: the image is not at positions of the decoder sequence",
     "cross-attention / encoder-decoder / image-prefix kinds: drop and mask are one image-free pass (test_kinds.py)"),
    ("*", r"^\w+ is not in transformers \d", "a class this release lacks"),
    ("hf-4.49|hf-4.57", r"transformers 4\.49-5\.14's GitForCausalLM shifts its labels twice",
     "an upstream bug of 4.49-5.14 (calplug refuses those releases; test_kinds.py checks it)"),
    ("hf-4.57", r"transformers < 5\.13's Florence2ForConditionalGeneration computes its own loss",
     "an upstream bug of 4.56-5.12 (calplug refuses those releases; test_kinds.py checks it)"),
    ("py|hf-4.57", r"transformers after 4\.49 .* splices BLIP-2's queries only at placeholder ids",
     "the query-prefix layout exists up to 4.49 (hf-4.45, hf-4.49 run it)"),
    ("hf-*", r"transformers < 5\.0's PaliGemma, called without labels, attends bidirectionally",
     "no from-scratch decoding reference there (test_decoding.py); py runs it"),
    ("py", r"HYV4VLForConditionalGeneration: once its sparse-attention indexer keeps fewer keys",
     "its own cached generate() is not its from-scratch forward (test_decoding.py); the other decoding tests run it"),
    ("*", r": contrastive decoding refused \(NOT_DECODED\)$",
     "a family contrastive decoding refuses; test_decoding.py's greedy test asserts the refusal and its reason"),
    ("hf-4.45", r"transformers 4\.45's OPT decoder takes no position_ids",
     "BLIP-2 / InstructBLIP with OPT on 4.45: refused with the reason (test_family_support.py); hf-4.49 runs them"),
    ("hf-4.49", r"transformers 4\.49\.0's ChameleonModel\.forward indexes inputs_embeds",
     "an upstream bug of 4.49 (calplug refuses the release; test_family_support.py checks it)"),
    ("hf-4.49|hf-4.57", r"transformers 4\.(49\.0|57\.6)'s Emu3ForConditionalGeneration\.forward",
     "upstream bugs of 4.49 / 4.57 (calplug refuses those releases; test_family_support.py checks it); py runs Emu3"),
    # missing here, run by another env (or by hand: docs/testing.md)
    ("py", r"needs the timm package", "timm needs a torchvision that loads beside the CPU torch: tox -e timm"),
    ("hf-*", r"needs the timm package", "as in py: tox -e timm"),
    ("py", r"calplug is imported from a source checkout \(editable install\)",
     "the wheel check runs in tox -e patches"),
    ("py", r"needs the llava-torch==1\.2\.2\.post1 files", "the patched LLaVA runs in tox -e patches"),
    ("py|patches", r"set CALPLUG_(MGM|LLAVA_NEXT)_SRC=", "MGM / LLaVA-NeXT sources: tox -e mgm / llava-next"),
    ("llava", r"set CALPLUG_(MGM|LLAVA_NEXT)_SRC to a checkout", "MGM / LLaVA-NeXT sources: tox -e mgm / llava-next"),
    ("hf-*", r"the image processor reads images with pillow",
     "the hf-4.x envs install no pillow (tox.ini); py runs the processor commands"),
    ("py", r"/usr/bin/chromium is missing", "the browser test needs a system chromium (.ci/run installs it)"),
    ("swift", r"swift sft on Qwen2-VL needs torchvision", "tox -e swift-qwen2vl (not in CI: ~7 GB)"),
    ("axolotl", r"axolotl < 0\.21 loads no plugin from the axolotl\.plugins entry point",
     "axolotl 0.21 needs Python 3.12: tox -e axolotl-py312 (not in CI)"),
]


def expected(env: str, reason: str) -> str | None:
    """Why ``reason`` is an expected skip in ``env`` (None: it is not)."""
    for envs, pattern, why in EXPECTED:
        if any(fnmatch.fnmatchcase(env, e) for e in envs.split("|")) and re.search(pattern, reason):
            return why
    return None


def skips(root) -> list[tuple[str, str]]:
    """(test, reason) of every skipped testcase of a parsed junit XML."""
    out = []
    for case in root.iter("testcase"):
        skipped = case.find("skipped")
        if skipped is not None and skipped.get("type") != "pytest.xfail":
            test = f"{case.get('classname')}::{case.get('name')}".lstrip(":")
            out.append((test, skipped.get("message", "").strip()))
    return out


def report(results_dir: pathlib.Path, envs: list[str]) -> tuple[str, int]:
    """(the printed report, number of unexpected skips)."""
    kept, ignored = _results.current(results_dir.glob("*.xml"))
    lines, unexpected = [], 0
    for line in ignored:
        lines.append(f"left out {line}")
    if envs:
        found = {path.stem for path, _ in kept}
        for env in envs:
            if env not in found:
                lines.append(f"{env}: no results of this source in {results_dir}")
                unexpected += 1
        kept = [(path, root) for path, root in kept if path.stem in envs]
    for path, root in kept:
        env = path.stem
        found = skips(root)
        total = sum(1 for _ in root.iter("testcase"))
        lines.append(f"{env}: {len(found)} of {total} tests skipped")
        by_reason = collections.Counter(reason for _, reason in found)
        for reason, n in by_reason.most_common():
            why = expected(env, reason)
            lines.append(f"  {n:4d}  {'expected' if why else 'UNEXPECTED'}: {reason}")
            if why is None:
                unexpected += n
                first = next(test for test, r in found if r == reason)
                lines.append(f"        first: {first}")
    lines.append(f"{unexpected} unexpected skip{'s' if unexpected != 1 else ''}"
                 + (" (tests/skip_report.py EXPECTED lists where a skip is expected and why)"
                    if unexpected else ""))
    return "\n".join(lines), unexpected


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python tests/skip_report.py RESULTS_DIR [ENV ...]", file=sys.stderr)
        return 2
    text, unexpected = report(pathlib.Path(argv[0]), argv[1:])
    print(text)
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
