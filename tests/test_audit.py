"""`calplug audit` / `calplug.audit`: the score is the mean log-probability gain of the training
batch's answer tokens (`calplug.token_gaps`), computed through the model's own processor and chat
template from each data format alike; every assistant turn is supervised, several images reach
the model; every sample that cannot be scored says why while the run goes on; bad arguments exit
2 with one line; an interrupted run resumes; a filtered copy reads back through the same reader.

Models: a tiny seeded Llava saved with a processor over the demo's word vocabulary
(`calplug.testing.tiny_llava_processor`); its chat template writes the demo's training sequence.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import calplug
from calplug import auditing, cli, data_files, processing
from calplug.cli import audit as audit_command
from calplug.cli import synthetic
from calplug.gap import IGNORE_INDEX
from calplug.testing import tiny_llava, tiny_llava_processor
from _skips import importorskip

importorskip("tokenizers", "tokenizers", "it is a transformers dependency (pip install tokenizers); it builds the test tokenizer")
importorskip("PIL", "pillow", "the audit reads images with pillow: pip install pillow (tox -e py has it)")

VOCAB = synthetic.Vocab()
PROMPT = "<image>\n" + " ".join(synthetic.PROMPT)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny Llava saved with its processor (chat template included)."""
    folder = tmp_path_factory.mktemp("model")
    tiny_llava(0, vocab_size=len(VOCAB)).save_pretrained(folder)
    tiny_llava_processor(VOCAB.words).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(saved):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(saved), AutoProcessor.from_pretrained(saved)


def world(folder: Path, n: int = 6, noise: float = 0.5, seed: int = 0):
    """``n`` demo samples: images under ``folder/images``, LLaVA records (caption without <eos>:
    the template adds it) and the CaptionSet they come from."""
    data = synthetic.make_set(n, seed=seed, noise=noise)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, image in enumerate(data.images):
        image.save(folder / "images" / f"{i}.png")
        records.append({"id": f"s{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": PROMPT}, {"from": "gpt", "value": " ".join(data.captions[i][:-1])}]})
    return records, data


def as_messages(record: dict) -> dict:
    """The same sample in the ShareGPT-style format LLaMA-Factory and ms-swift read."""
    roles = {"human": "user", "gpt": "assistant"}
    return {"messages": [{"role": roles[t["from"]], "content": t["value"]} for t in record["conversations"]],
            "images": [record["image"]], "id": record["id"]}


def write(path: Path, records: list, lines: bool) -> Path:
    if lines:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def by_hand(model, batch: dict) -> list[float]:
    """The score from its definition: per sample, the mean over the supervised rows of
    log_softmax(logits with the image) - log_softmax(logits of the text tokens alone), at the
    target; two plain forwards of the model, no calplug."""
    ids, labels = batch["input_ids"], batch["labels"]
    image = model.config.image_token_index
    model.eval()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"]).logits.float().log_softmax(-1)
        scores = []
        for b in range(ids.shape[0]):
            keep = torch.nonzero(ids[b] != image).squeeze(1)
            text = model(input_ids=ids[b, keep][None], position_ids=keep[None]).logits[0].float().log_softmax(-1)
            gains = [float(full[b, i, labels[b, i + 1]] - text[k, labels[b, i + 1]])
                     for k, i in enumerate(keep.tolist()) if i + 1 < ids.shape[1] and labels[b, i + 1] != IGNORE_INDEX]
            scores.append(sum(gains) / len(gains))
    return scores


# -- the score ------------------------------------------------------------------------------------
def test_scores_from_a_file_equal_the_definition_on_the_training_batch(loaded, tmp_path):
    """Through the processor and chat template, a LLaVA file gives the demo's training batch
    exactly (caption and <eos> supervised), and each score is the mean log-probability gain
    computed by hand from two forwards; a DataLoader of that batch gives the same records."""
    model, processor = loaded
    records, data = world(tmp_path)
    found = list(calplug.audit(model, write(tmp_path / "d.json", records, False), processor=processor, batch_size=4))
    assert [(r["index"], r["id"]) for r in found] == [(i, f"s{i}") for i in range(6)]
    batch = synthetic.batch(data, list(range(6)), VOCAB)
    expected = by_hand(model, batch)
    assert all(r["tokens"] == synthetic.CAPTION_LENGTH and r["error"] is None for r in found)
    assert [r["score"] for r in found] == pytest.approx(expected, abs=2e-5)
    assert max(expected) - min(expected) > 1e-3  # the samples differ: the test could tell them apart
    encoded = processing.encode_conversation(processor, data_files.conversation(records[0]).messages,
                                             [data.images[0]])
    assert torch.equal(encoded["input_ids"], batch["input_ids"][:1])
    assert torch.equal(encoded["labels"], batch["labels"][:1])
    torch.testing.assert_close(encoded["pixel_values"], batch["pixel_values"][:1])
    loader = torch.utils.data.DataLoader(range(6), batch_size=4, collate_fn=lambda i: synthetic.batch(data, i, VOCAB))
    again = list(calplug.audit(model, loader))
    assert [r["index"] for r in again] == list(range(6)) and all(r["id"] is None for r in again)
    assert [r["score"] for r in again] == pytest.approx([r["score"] for r in found], abs=1e-6)
    assert list(calplug.audit(model, loader, start=5))[0]["index"] == 5


def test_record_statistics_and_lowest_tokens(loaded):
    model, _ = loaded
    data = synthetic.make_set(2, seed=3)
    batch = synthetic.batch(data, [0, 1], VOCAB)
    found = calplug.token_gaps(model, batch, log_probs=True)
    rec = calplug.audit_batch(model, batch, lowest=14)[0]
    rows = found.supervised[0] & found.contrasted[0]
    gains, gaps = found.log_prob_gain[0, rows], found.gaps[0, rows]
    assert rec["mean_gain"] == pytest.approx(float(gains.mean()), abs=1e-6) == rec["score"]
    assert rec["min_gain"] == pytest.approx(float(gains.min()), abs=1e-6)
    assert rec["mean_gap"] == pytest.approx(float(gaps.mean()), abs=1e-6)
    assert rec["log_prob"] - rec["log_prob_without"] == pytest.approx(rec["mean_gain"], abs=1e-5)
    assert [t["gain"] for t in rec["lowest"]] == sorted(t["gain"] for t in rec["lowest"])
    assert sorted(t["position"] for t in rec["lowest"]) == list(range(14))
    assert rec["lowest"][0]["token_id"] == VOCAB.encode(data.captions[0])[rec["lowest"][0]["position"]]
    assert calplug.audit_batch(model, batch, score="min")[0]["score"] == pytest.approx(rec["min_gain"])
    with pytest.raises(calplug.CALConfigError, match="score must be one of"):
        calplug.audit_batch(model, batch, score="median")


def test_every_format_gives_the_same_records(loaded, tmp_path):
    model, processor = loaded
    records, _ = world(tmp_path)
    messages = [as_messages(r) for r in records]
    runs = {}
    for name, recs, lines in (("llava.json", records, False), ("llava.jsonl", records, True),
                              ("messages.json", messages, False), ("messages.jsonl", messages, True)):
        path = write(tmp_path / name, recs, lines)
        assert data_files.read(path).lines is lines
        runs[name] = list(calplug.audit(model, path, processor=processor, batch_size=3))
    first = runs.pop("llava.json")
    for name, found in runs.items():
        assert [(r["index"], r["id"], r["tokens"]) for r in found] == [(r["index"], r["id"], r["tokens"]) for r in first], name
        assert [r["score"] for r in found] == pytest.approx([r["score"] for r in first], abs=1e-6), name
    # a system string, `images` as one path and no <image> in the text (the image goes first)
    bare = dict(messages=[{"role": "user", "content": " ".join(synthetic.PROMPT)},
                          {"role": "assistant", "content": records[0]["conversations"][1]["value"]}],
                images=records[0]["image"], system="")
    assert list(calplug.audit(model, [bare], processor=processor, image_folder=tmp_path))[0]["score"] == \
        pytest.approx(first[0]["score"], abs=1e-6)


@pytest.mark.parametrize("second_image", [False, True], ids=["images-first", "image-in-a-later-turn"])
def test_multi_turn_supervises_every_assistant_turn(loaded, tmp_path, second_image):
    """Both answers (and the <eos> the template writes after each) are supervised, nothing else:
    with every image before the first answer (its boundaries found from the text alone) and with
    an image in the second user turn (the first answer's boundaries found by the processor)."""
    model, processor = loaded
    records, data = world(tmp_path, n=2)
    first, second = " ".join(data.captions[0][:-1]), "a small red square"
    images = ["images/0.png", "images/1.png"] if second_image else "images/0.png"
    turns = [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": first},
             {"from": "human", "value": (PROMPT if second_image else "describe :")}, {"from": "gpt", "value": second}]
    conv = data_files.conversation(dict(image=images, conversations=turns))
    calls = []

    class Counting:  # the processor, counting its passes over the images
        def __getattr__(self, name):
            return getattr(processor, name)

        def __call__(self, *args, **options):
            calls.append(options.get("images"))
            return processor(*args, **options)

    encoded = processing.encode_conversation(Counting(), conv.messages, data_files.load_images(conv.images, tmp_path))
    # the whole conversation once; with an image after the first answer, that answer's two boundaries
    assert len(calls) == (3 if second_image else 1)
    ids, labels = encoded["input_ids"][0], encoded["labels"][0]
    words = VOCAB.decode(ids)
    again = ["<image>"] * 16 if second_image else []
    assert words == (["<bos>"] + ["<image>"] * 16 + ["describe", ":"] + first.split() + ["<eos>"]
                     + again + ["describe", ":"] + second.split() + ["<eos>"])
    supervised = [w for w, lab in zip(words, labels.tolist()) if lab != IGNORE_INDEX]
    assert supervised == first.split() + ["<eos>"] + second.split() + ["<eos>"]
    assert encoded["pixel_values"].shape[0] == (2 if second_image else 1)
    rec = list(calplug.audit(model, [dict(image=images, conversations=turns)], processor=processor,
                             image_folder=tmp_path))[0]
    assert rec["tokens"] == len(supervised)


def test_several_images_reach_the_model_and_batch_with_single_image_samples(loaded, tmp_path):
    model, processor = loaded
    _, data = world(tmp_path, n=3)
    two = {"id": "two", "images": ["images/0.png", "images/1.png"], "messages": [
        {"role": "user", "content": "<image> <image>\ndescribe :"}, {"role": "assistant", "content": "a red square"}]}
    swapped = dict(two, id="swapped", images=["images/0.png", "images/2.png"])
    one = {"id": "one", "image": "images/2.png", "conversations": [
        {"from": "human", "value": PROMPT}, {"from": "gpt", "value": "a red square"}]}
    conv = data_files.conversation(two)
    encoded = processing.encode_conversation(processor, conv.messages, data_files.load_images(conv.images, tmp_path))
    assert encoded["pixel_values"].shape[0] == 2 and int((encoded["input_ids"] == VOCAB.image).sum()) == 32
    together = list(calplug.audit(model, [two, swapped, one], processor=processor, image_folder=tmp_path, batch_size=3))
    alone = [list(calplug.audit(model, [r], processor=processor, image_folder=tmp_path))[0] for r in (two, swapped, one)]
    assert [r["score"] for r in together] == pytest.approx([r["score"] for r in alone], abs=1e-5)
    assert abs(together[0]["score"] - together[1]["score"]) > 1e-4  # the second image matters


# -- samples that cannot be scored ------------------------------------------------------------------
def broken_records(folder: Path) -> list:
    records, _ = world(folder, n=2)
    (folder / "images" / "bad.png").write_text("not an image")
    answer = {"from": "gpt", "value": "a red square"}
    return [
        records[0],
        {"id": "missing", "image": "images/nope.png", "conversations": [{"from": "human", "value": PROMPT}, answer]},
        {"id": "unreadable", "image": "images/bad.png", "conversations": [{"from": "human", "value": PROMPT}, answer]},
        {"id": "empty", "image": "images/0.png", "conversations": [{"from": "human", "value": PROMPT},
                                                                 {"from": "gpt", "value": "  "}]},
        {"id": "no-answer", "image": "images/0.png", "conversations": [{"from": "human", "value": PROMPT}]},
        {"id": "long", "image": "images/0.png", "conversations": [
            {"from": "human", "value": PROMPT}, {"from": "gpt", "value": "a red square " * 12}]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "describe :"}, answer]},
        {"id": "two-placeholders", "image": "images/0.png", "conversations": [
            {"from": "human", "value": "<image> <image> describe :"}, answer]},
        {"id": "no-turns"},
        records[1],
    ]


REASONS = ["missing-image", "unreadable-image", "no-answer", "no-answer", "too-long", "no-image", "format", "format"]


def test_each_problem_is_the_sample_s_own_and_the_run_goes_on(saved, tmp_path, capsys):
    path = write(tmp_path / "d.json", broken_records(tmp_path), False)
    out = tmp_path / "out"
    assert cli.main(["audit", "--model", str(saved), "--data", str(path), "--out", str(out), "--max-length", "40",
                     "--batch-size", "4", "--no-progress", "--drop-bottom", "50"]) == 0
    found = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["index"] for r in found] == list(range(10))
    assert [r["reason"] for r in found[1:9]] == REASONS
    assert all(r["score"] is None and r["error"] for r in found[1:9])
    assert "image not found" in found[1]["error"] and "cannot be read" in found[2]["error"]
    assert "the answer is empty" in found[3]["error"] and "no assistant turn" in found[4]["error"]
    assert "56 tokens, more than the model's limit of 40" in found[5]["error"]
    assert "2 <image> placeholders in the text but 1 images" in found[7]["error"]
    assert found[0]["score"] is not None and found[9]["score"] is not None
    printed = capsys.readouterr().out
    assert "10 samples: 2 scored, 7 could not be scored" in printed and "1 text-only" in printed
    assert "7 samples could not be scored: their records in scores.jsonl say why" in printed
    kept = json.loads((out / "filtered.json").read_text())
    # the higher of the two scored samples and the text-only one, in file order
    assert [r["id"] for r in kept] == (["s0", "text-only"] if found[0]["score"] > found[9]["score"]
                                       else ["text-only", "s1"])


def test_too_long_by_default_is_the_model_s_limit(tmp_path):
    folder = tmp_path / "model"
    tiny_llava(0, vocab_size=len(VOCAB), max_positions=30).save_pretrained(folder)
    tiny_llava_processor(VOCAB.words).save_pretrained(folder)
    records, _ = world(tmp_path, n=1)   # 1 + 16 + 2 + 14 = 33 tokens
    path = write(tmp_path / "d.json", records, False)
    assert cli.main(["audit", "--model", str(folder), "--data", str(path), "--out", str(tmp_path / "o"),
                     "--no-progress"]) == 0
    rec = json.loads((tmp_path / "o" / "scores.jsonl").read_text())
    assert rec["reason"] == "too-long" and "33 tokens, more than the model's limit of 30" in rec["error"]


def test_a_refused_sample_is_its_own_error(loaded, tmp_path, monkeypatch):
    """A sample calplug refuses (a `CALInputError` from the scoring) fails alone: its batch is
    scored again one sample at a time, and the others keep their scores."""
    model, processor = loaded
    records, _ = world(tmp_path, n=3)
    before = list(calplug.audit(model, records, processor=processor, image_folder=tmp_path, batch_size=3))
    real, marker = auditing.audit_batch, VOCAB.ids["quiet"]

    def refuses(model, batch, *a, **k):
        if bool(((batch["input_ids"] == marker).sum(1) >= 5).any()):
            raise calplug.CALInputError("a refused batch")
        return real(model, batch, *a, **k)

    monkeypatch.setattr(auditing, "audit_batch", refuses)
    odd = dict(records[1], conversations=[{"from": "human", "value": PROMPT}, {"from": "gpt", "value": "a square" + " quiet" * 5}])
    found = list(calplug.audit(model, [records[0], odd, records[2]], processor=processor, image_folder=tmp_path,
                               batch_size=3))
    assert found[1]["score"] is None and found[1]["reason"] == "refused"
    assert found[1]["error"] == "calplug cannot score this sample: a refused batch"
    assert [found[0]["score"], found[2]["score"]] == pytest.approx([before[0]["score"], before[2]["score"]], abs=1e-6)


def test_a_processor_failure_is_the_sample_s_own(loaded, tmp_path):
    """A processor that raises on one sample's image (as a real one does on an image it cannot
    resize) fails that sample alone, reason "processor"."""
    from PIL import Image

    model, processor = loaded
    records, _ = world(tmp_path, n=2)
    Image.new("RGB", (7, 7), (9, 9, 9)).save(tmp_path / "images" / "tiny.png")

    class Picky:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, images=None, text=None, **options):
            flat = [im for x in (images or []) for im in (x if isinstance(x, list) else [x])]
            if any(im.size == (7, 7) for im in flat):
                raise ValueError("height and width must be larger than the patch size")
            return self.inner(images=images, text=text, **options)

    small = dict(records[0], id="small", image="images/tiny.png")
    found = list(calplug.audit(model, [records[0], small, records[1]], processor=Picky(processor), image_folder=tmp_path))
    assert [r["reason"] for r in found if r["score"] is None] == ["processor"]
    assert "height and width must be larger than the patch size" in found[1]["error"]
    assert found[0]["score"] is not None and found[2]["score"] is not None


# -- bad arguments ----------------------------------------------------------------------------------
def test_bad_arguments_exit_2_with_one_line(saved, tmp_path, capsys):
    records, _ = world(tmp_path, n=2)
    good = str(write(tmp_path / "d.json", records, False))
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "one.json").write_text(json.dumps({"samples": []}))
    bare = tmp_path / "bare"
    tiny_llava(0, vocab_size=len(VOCAB)).save_pretrained(bare)
    tiny_llava_processor(VOCAB.words, chat_template=None).save_pretrained(bare)
    base = ["audit", "--model", str(saved), "--out", str(tmp_path / "o"), "--no-progress"]
    capsys.readouterr()
    cases = [
        (base + ["--data", str(tmp_path / "nope.json")], "is not a file"),
        (base + ["--data", str(tmp_path / "bad.json")], "neither a JSON list of samples nor JSON Lines"),
        (base + ["--data", str(tmp_path / "one.json")], "holds one JSON object, not a list of samples"),
        (base + ["--data", good, "--keep-top", "0"], "--keep-top takes a percentage in (0, 100]"),
        (base + ["--data", good, "--drop-bottom", "ten"], "--drop-bottom takes a percentage"),
        (base + ["--data", good, "--batch-size", "0"], "--batch-size must be >= 1"),
        (base + ["--data", good, "--image-folder", str(tmp_path / "nowhere")], "is not a folder"),
        (base + ["--data", good, "--device", "cuda:x"], "is not a device torch knows"),
        (["audit", "--model", str(tmp_path / "none"), "--data", good, "--out", str(tmp_path / "o")], "is not a folder"),
        (["audit", "--model", str(bare), "--data", good, "--out", str(tmp_path / "o")], "has no chat template"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("calplug audit: error: ") and err.count("\n") == 1 and message in err, (argv, err)
    with pytest.raises(SystemExit) as exit_:
        cli.main(base + ["--data", good, "--keep-top", "10", "--drop-bottom", "10"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


# -- resuming and filtering -------------------------------------------------------------------------
def test_an_interrupted_run_resumes_from_its_scores(saved, tmp_path, monkeypatch, capsys):
    records, _ = world(tmp_path, n=10)
    path = str(write(tmp_path / "d.json", records, False))
    argv = ["audit", "--model", str(saved), "--data", path, "--batch-size", "3", "--no-progress"]
    assert cli.main(argv + ["--out", str(tmp_path / "whole")]) == 0
    whole = (tmp_path / "whole" / "scores.jsonl").read_text().splitlines()

    real, scored = auditing.audit_batch, []

    def interrupted(model, batch, *a, **k):
        if k.get("tokens"):  # the report's rescoring
            return real(model, batch, *a, **k)
        if len(scored) == 6:
            raise KeyboardInterrupt
        scored.extend([1] * batch["input_ids"].shape[0])
        return real(model, batch, *a, **k)

    monkeypatch.setattr(auditing, "audit_batch", interrupted)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv + ["--out", str(out)])
    assert len((out / "scores.jsonl").read_text().splitlines()) == 6
    with open(out / "scores.jsonl", "a") as f:  # a line cut off as the process died
        f.write(whole[6][:25])
    scored.clear()
    capsys.readouterr()
    assert cli.main(argv + ["--out", str(out)]) == 0
    assert len(scored) == 4  # only the samples not yet scored
    assert "resuming after 6 scored samples" in capsys.readouterr().out
    resumed = (out / "scores.jsonl").read_text().splitlines()
    assert [json.loads(x)["index"] for x in resumed] == list(range(10))
    for a, b in zip(resumed, whole):
        assert json.loads(a)["score"] == pytest.approx(json.loads(b)["score"], abs=1e-6)
    # another data file in the same folder is refused, --restart starts over
    other = str(write(tmp_path / "e.json", records[:4], False))
    assert cli.main(["audit", "--model", str(saved), "--data", other, "--out", str(out), "--no-progress"]) == 2
    assert "holds scores.jsonl of another audit (data_sha256 differ" in capsys.readouterr().err
    assert cli.main(["audit", "--model", str(saved), "--data", other, "--out", str(out), "--no-progress", "--restart"]) == 0
    assert len((out / "scores.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize("lines", [False, True], ids=["json", "jsonl"])
def test_filtered_copy_reads_back_through_the_same_reader(saved, tmp_path, lines):
    records, _ = world(tmp_path, n=8)
    records = [as_messages(r) if i % 2 else r for i, r in enumerate(records)]  # both formats in one file
    path = write(tmp_path / ("d.jsonl" if lines else "d.json"), records, lines)
    out = tmp_path / "out"
    assert cli.main(["audit", "--model", str(saved), "--data", str(path), "--out", str(out), "--keep-top", "75",
                     "--no-progress"]) == 0
    found = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    filtered = out / ("filtered.jsonl" if lines else "filtered.json")
    back = data_files.read(filtered)
    assert back.lines is lines and len(back) == 6
    top = sorted(found, key=lambda r: -r["score"])[:6]
    assert back.records == [records[i] for i in sorted(r["index"] for r in top)]  # unchanged, in file order
    model, processor = _model_and_processor(saved)
    again = list(calplug.audit(model, filtered, processor=processor, image_folder=tmp_path))
    assert {r["id"]: r["score"] for r in again} == pytest.approx({r["id"]: r["score"] for r in top}, abs=1e-6)


def _model_and_processor(folder):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(folder), AutoProcessor.from_pretrained(folder)


def test_select_and_summary():
    recs = [dict(index=i, score=s) for i, s in enumerate([0.5, -1.0, 0.2, 0.2, 3.0])]
    recs += [dict(index=5, score=None, reason="no-image"), dict(index=6, score=None, reason="missing-image")]
    assert auditing.select(recs, keep_top=40) == [0, 4, 5]
    assert auditing.select(recs, drop_bottom=40) == [0, 3, 4, 5]  # ties broken by input order
    assert auditing.select(recs, min_score=0.2) == [0, 2, 3, 4, 5]
    with pytest.raises(calplug.CALConfigError, match="exactly one"):
        auditing.select(recs, keep_top=10, min_score=0.0)
    summary = auditing.summarize(recs, lowest=2)
    assert (summary["samples"], summary["scored"], summary["failed"], summary["text_only"]) == (7, 5, 1, 1)
    assert summary["lowest"] == [1, 2]
    values = torch.tensor([0.5, -1.0, 0.2, 0.2, 3.0])
    for q, v in summary["quantiles"].items():
        assert v == pytest.approx(float(torch.quantile(values, float(q))))


def test_model_limit_reads_the_text_config_and_a_real_tokenizer_limit(loaded):
    model, processor = loaded
    assert audit_command.model_limit(model, processor) == model.config.text_config.max_position_embeddings
    processor.tokenizer.model_max_length = 100
    try:
        assert audit_command.model_limit(model, processor) == 100
    finally:
        processor.tokenizer.model_max_length = int(1e30)
