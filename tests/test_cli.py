"""The `calplug` command fails cleanly: one line on stderr and exit status 2 for what a user can
fix, a traceback only with --debug, and the output folder checked before any work."""
from __future__ import annotations

import pytest

import calplug
from calplug import cli
from calplug.cli import demo


def test_an_output_path_that_is_a_file_fails_before_any_training(tmp_path, capsys, monkeypatch):
    trained = []
    monkeypatch.setattr(demo, "run_experiment", lambda *a, **k: trained.append(1))
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
    monkeypatch.setattr(demo, "run_experiment", lambda *a, **k: pytest.fail("trained"))
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
