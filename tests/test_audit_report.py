"""`calplug audit`'s report: report.html lists the lowest-scoring samples lowest first, with their
images and one coloured chip per answer token, and renders in the real headless browser CI
installs (the page's own script counts what the browser laid out; a screenshot shows the lowest
sample's image and not the highest's); the printed summary and the histogram follow the records."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from calplug import cli
from calplug.cli import synthetic
from calplug.testing import tiny_llava, tiny_llava_processor
from _skips import importorskip, missing

importorskip("tokenizers", "tokenizers", "it is a transformers dependency (pip install tokenizers); it builds the test tokenizer")
importorskip("PIL", "pillow", "the audit reads images with pillow: pip install pillow (tox -e py has it)")

CHROMIUM = "/usr/bin/chromium"
VOCAB = synthetic.Vocab()
# one solid colour per sample's image, none of them a colour the page draws with otherwise
COLOURS = [(0, 160, 80), (160, 80, 0), (80, 0, 160), (0, 80, 160), (160, 0, 80), (80, 160, 0)]


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """An audit of six samples (solid-colour images, demo captions) by a tiny saved Llava, the
    report showing the lowest two."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("audit")
    tiny_llava(0, vocab_size=len(VOCAB)).save_pretrained(folder / "model")
    tiny_llava_processor(VOCAB.words).save_pretrained(folder / "model")
    data = synthetic.make_set(len(COLOURS), seed=1, noise=0.5)
    records = []
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (32, 32), colour).save(folder / f"{i}.png")
        records.append({"id": f"c{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\ndescribe :"},
            {"from": "gpt", "value": " ".join(data.captions[i][:-1])}]})
    (folder / "data.json").write_text(json.dumps(records))
    out = folder / "out"
    assert cli.main(["audit", "--model", str(folder / "model"), "--data", str(folder / "data.json"),
                     "--out", str(out), "--report-samples", "2", "--no-progress"]) == 0
    found = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    return out, sorted(found, key=lambda r: r["score"])


def test_report_lists_the_lowest_samples_lowest_first(audited):
    out, ranked = audited
    page = (out / "report.html").read_text()
    shown = re.findall(r"<div class='sample' id='rank-(\d)' data-index='(\d+)' data-score='([-0-9.]+)'", page)
    assert [(int(r), int(i)) for r, i, _ in shown] == [(1, ranked[0]["index"]), (2, ranked[1]["index"])]
    assert [float(s) for *_, s in shown] == pytest.approx([ranked[0]["score"], ranked[1]["score"]], abs=1e-6)
    assert page.count("class='tok'") == ranked[0]["tokens"] + ranked[1]["tokens"]
    assert page.count("<img class='thumb'") == 2
    summary = json.loads((out / "audit.json").read_text())["summary"]
    assert summary["lowest"][:2] == [r["index"] for r in ranked[:2]]
    from PIL import Image

    with Image.open(out / "scores.png") as im:
        assert im.size[0] > 500 and im.size[1] > 300


def test_report_renders_in_a_headless_browser(audited, tmp_path):
    if not Path(CHROMIUM).exists():
        missing("chromium", f"{CHROMIUM} is missing: install it with "
                    "`apt-get update && apt-get install -y chromium` to run the browser test")
    out, ranked = audited
    profile = tmp_path / "profile"
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", "--force-color-profile=srgb",
             "--hide-scrollbars", f"--user-data-dir={profile}"]
    url = (out / "report.html").resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    # the page's own script: what the browser laid out with a visible box, and the first sample
    state = dict(re.findall(r'data-(rendered-tokens|loaded-images|first-sample)="(\d*)"', dom))
    assert state, f"the browser did not run the page (DOM starts: {dom[:300]!r})"
    assert int(state["rendered-tokens"]) == ranked[0]["tokens"] + ranked[1]["tokens"]
    assert int(state["loaded-images"]) == 2
    assert int(state["first-sample"]) == ranked[0]["index"]
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,1600", url], capture_output=True, timeout=120)
    import numpy as np
    from PIL import Image

    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.int16)

    def count(colour):
        return int((np.abs(pixels - np.array(colour, dtype=np.int16)) <= 6).all(-1).sum())

    lowest, highest = COLOURS[ranked[0]["index"]], COLOURS[ranked[-1]["index"]]
    assert count(lowest) >= 0.9 * 128 * 128  # the lowest sample's image, at full size on screen
    assert count(highest) == 0                # the highest-scoring sample is not in the report
    shutil.rmtree(profile, ignore_errors=True)
