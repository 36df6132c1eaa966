"""The `calplug` command fails cleanly: one line on stderr and exit status 2 for what a user can
fix, a traceback only with --debug, and the output folder checked before any work."""
from __future__ import annotations

from pathlib import Path

import pytest

import calplug
from calplug import cli
from calplug.cli import demo_training


def test_an_output_path_that_is_a_file_fails_before_any_training(tmp_path, capsys, monkeypatch):
    trained = []
    monkeypatch.setattr(demo_training, "run_experiment", lambda *a, **k: trained.append(1))
    target = tmp_path / "results"
    target.write_text("not a folder")
    assert cli.main(["demo", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("calplug demo: error: --out") and "is a file, not a folder" in err
    assert trained == []


def test_an_unwritable_output_folder_is_named(tmp_path, capsys, monkeypatch):
    import os

    if os.geteuid() == 0:
        # root writes anywhere: a folder under a file stands in for "cannot be written"
        target = tmp_path / "file" / "out"
        (tmp_path / "file").write_text("x")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "out"
    monkeypatch.setattr(demo_training, "run_experiment", lambda *a, **k: pytest.fail("trained"))
    assert cli.main(["demo", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "cannot be written" in err and str(target) in err and err.count("\n") == 1


def test_debug_shows_the_error_itself(tmp_path):
    with pytest.raises(calplug.CALConfigError, match="is not a folder"):
        cli.main(["inspect", "--model", str(tmp_path / "nope"), "--debug"])


def test_errors_become_one_line(tmp_path, capsys):
    assert cli.main(["inspect", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("calplug inspect: error: --model") and err.count("\n") == 1


def test_bench_prints_its_table_before_writing_the_json(tmp_path, capsys, monkeypatch):
    # (that --json is checked before any work: tests/test_errors.py)
    from calplug.cli import bench

    order = []
    monkeypatch.setattr(bench, "benchmark", lambda cfg: {"targets": {}})
    monkeypatch.setattr(bench, "format_report", lambda r: "THE TABLE")
    real_dump = bench.json.dump
    monkeypatch.setattr(bench.json, "dump", lambda *a, **k: (order.append(capsys.readouterr().out),
                                                             real_dump(*a, **k)))
    out = tmp_path / "r.json"
    assert cli.main(["bench", "--device", "cpu", "--json", str(out)]) == 0
    assert order == ["THE TABLE\n"] and out.is_file()


def test_patch_refuses_files_it_cannot_write_before_changing_anything(tmp_path, capsys, monkeypatch):
    import os

    from calplug import patching

    p = patching.resolve("llava-v1.2.2")
    root = tmp_path / "checkout"
    for fd in p.files:
        (root / fd.path).parent.mkdir(parents=True, exist_ok=True)
        (root / fd.path).write_text("whatever\n")
    locked = root / p.files[0].path
    real_access = os.access
    # a read-only file (simulated: root may write anything, so chmod alone shows nothing here)
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    monkeypatch.setattr(patching, "apply", lambda *a, **k: pytest.fail("applied despite a read-only file"))
    assert cli.main(["patch", "apply", p.name, str(root)]) == 2
    err = capsys.readouterr().err
    assert f"cannot edit {p.files[0].path}" in err and "read-only" in err and "Nothing was changed" in err
    assert locked.read_text() == "whatever\n"
