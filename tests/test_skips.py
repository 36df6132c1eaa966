"""Skips that name what is missing (tests/_skips.py) and the per-env skip report
(tests/skip_report.py): a skip for want of something fails where CALPLUG_REQUIRE names it; only
"the package itself is not installed" may skip, a broken install raises; the report counts skips
by reason per env and fails on one its table does not expect, reading only current results."""
from __future__ import annotations

import contextlib
import sys
from xml.sax.saxutils import quoteattr

import pytest

import _results
import _skips
import skip_report


@contextlib.contextmanager
def raises(error, match):
    """``pytest.raises(error, match=...)``, except that a skip raised instead is a failure of this
    test: left alone, the skip would propagate and report this test as skipped, so a helper that
    skips where it must fail or raise would pass unseen."""
    try:
        with pytest.raises(error, match=match):
            yield
    except pytest.skip.Exception as skip:
        pytest.fail(f"skipped ({skip}) where {error.__name__} was due", pytrace=False)


def fails(match):
    return raises(pytest.fail.Exception, match)


def test_missing_skips_or_fails_where_the_env_requires_it(monkeypatch):
    monkeypatch.delenv(_skips.REQUIRE, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"^thing is not installed: pip install thing$"):
        _skips.missing("thing", "thing is not installed: pip install thing")
    monkeypatch.setenv(_skips.REQUIRE, "other, thing")
    assert _skips.required() == {"other", "thing"}
    with fails(
            r"^thing is not installed: pip install thing \[CALPLUG_REQUIRE names 'thing'"):
        _skips.missing("thing", "thing is not installed: pip install thing")
    monkeypatch.setenv(_skips.REQUIRE, "something")   # another name: a skip
    with pytest.raises(pytest.skip.Exception):
        _skips.missing("thing", "thing is not installed: pip install thing")


def test_importorskip_skips_only_for_the_package_itself(tmp_path, monkeypatch):
    """A package that is not there skips; one that is there but whose import fails on a missing
    dependency raises that error (it must not pass as "not installed")."""
    monkeypatch.delenv(_skips.REQUIRE, raising=False)
    with pytest.raises(pytest.skip.Exception, match="calplug_absent_pkg is not installed: pip install it"):
        _skips.importorskip("calplug_absent_pkg", "absent", "pip install it")
    (tmp_path / "calplug_broken_pkg").mkdir()
    (tmp_path / "calplug_broken_pkg" / "__init__.py").write_text("import calplug_its_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with raises(ModuleNotFoundError, "calplug_its_missing_dependency"):
        _skips.importorskip("calplug_broken_pkg", "broken", "pip install it")
    monkeypatch.setenv(_skips.REQUIRE, "absent")
    with fails("CALPLUG_REQUIRE names 'absent'"):
        _skips.importorskip("calplug_absent_pkg", "absent", "pip install it")
    assert _skips.importorskip("json", "json", "") is sys.modules["json"]


@_skips.needs("calplug_tool", False, "calplug_tool is missing: apt-get install calplug_tool")
@_skips.needs("json", True, "never shown")
def _marked():
    pass


def test_needs_marker_is_applied_at_setup(request, monkeypatch):
    """tests/conftest.py applies every ``needs`` marker at setup: an unavailable one skips (or
    fails where required); an available one does nothing."""
    item = pytest.Function.from_parent(request.node.parent, name="_marked", callobj=_marked)
    monkeypatch.delenv(_skips.REQUIRE, raising=False)
    with pytest.raises(pytest.skip.Exception, match="calplug_tool is missing"):
        _skips.apply_needs(item)
    monkeypatch.setenv(_skips.REQUIRE, "calplug_tool")
    with fails("CALPLUG_REQUIRE names 'calplug_tool'"):
        _skips.apply_needs(item)
    monkeypatch.setenv(_skips.REQUIRE, "json")
    with pytest.raises(pytest.skip.Exception):
        _skips.apply_needs(item)


# -- the report ------------------------------------------------------------------------------------
def junit(folder, env, cases, source=None):
    stamp = _results.source_hash() if source is None else source
    body = "".join(
        f'<testcase classname="{module}" name="{name}">'
        + ("" if reason is None else f'<skipped type="pytest.skip" message={quoteattr(reason)}/>')
        + "</testcase>" for module, name, reason in cases)
    (folder / f"{env}.xml").write_text(
        f'<testsuites><testsuite><properties><property name="calplug_source" value="{stamp}"/>'
        f'<property name="calplug_env" value="{env}"/></properties>{body}</testsuite></testsuites>')


def test_report_counts_skips_by_reason_and_fails_on_an_unexpected_one(tmp_path, capsys):
    timm = "needs the timm package (TimmWrapper vision tower), which is not installed"
    junit(tmp_path, "py", [("tests.a", "test_1", None), ("tests.a", "test_2[x]", timm),
                           ("tests.a", "test_2[y]", timm)])
    junit(tmp_path, "hf-4.45", [("tests.b", "test_3", "Qwen3VLForConditionalGeneration needs transformers >= 4.57")])
    assert skip_report.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "py: 2 of 3 tests skipped" in out and f"     2  expected: {timm}" in out
    assert "hf-4.45: 1 of 1 tests skipped" in out and out.rstrip().endswith("0 unexpected skips")

    junit(tmp_path, "llava", [("tests.c", "test_4", "needs llava-torch==1.2.2.post1 (tox -e llava)"),
                              ("tests.c", "test_5", timm)])   # timm is expected in py and hf-*, not here
    junit(tmp_path, "patches", [("tests.d", "test_6", None)], source="0" * 16)   # stale
    assert skip_report.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "     1  UNEXPECTED: needs llava-torch==1.2.2.post1 (tox -e llava)\n        first: tests.c::test_4" in out
    assert f"     1  UNEXPECTED: {timm}" in out
    assert "left out patches.xml: recorded from other source" in out
    assert out.rstrip().startswith("left out") and "2 unexpected skips (tests/skip_report.py EXPECTED" in out
    # named envs must have current results
    assert skip_report.main([str(tmp_path), "py", "patches"]) == 1
    assert "patches: no results of this source" in capsys.readouterr().out


def test_expected_rows_are_patterns_that_compile():
    for envs, pattern, why in skip_report.EXPECTED:
        assert envs and why
        __import__("re").compile(pattern)
