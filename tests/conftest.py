import os
import sys

# Installed third-party calplug plugins would change what the tests measure: the suite switches
# them off itself (tox sets the same variable), before calplug builds its plugin manager.
os.environ["CALPLUG_DISABLE_ENTRYPOINTS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # the shared test helpers (cases.py, _close.py, ...)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))


def pytest_configure(config):
    config.addinivalue_line("markers", "calplug_needs(name, available, reason): skip naming what is "
                            "missing, or fail where $CALPLUG_REQUIRE names it (tests/_skips.py)")


def pytest_sessionstart(session):
    """Stamp the junit XML (when one is written) with the hash of the source that ran and the tox
    env (tests/_results.py): at session start, so a run whose every test skips is stamped too."""
    from _pytest.junitxml import xml_key

    import _results

    xml = session.config.stash.get(xml_key, None)
    if xml is not None:
        xml.add_global_property("calplug_source", _results.source_hash())
        xml.add_global_property("calplug_env", os.environ.get("TOX_ENV_NAME", ""))


def pytest_runtest_setup(item):
    import _skips

    _skips.apply_needs(item)


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """What the cases of tests/cases.py share within a session (a tiny CLIP tower, saved once)."""
    from cases import Env

    return Env(tmp_path_factory)


@pytest.fixture(scope="session", autouse=True)
def _record_versions(record_testsuite_property):
    """The transformers and torch of this run, in the junit results the support matrix reads."""
    import transformers

    record_testsuite_property("transformers", transformers.__version__)
    record_testsuite_property("torch", torch.__version__)


@pytest.fixture(scope="module")
def model():
    """calplug.testing's tiny Llava (seed 0) in train mode, one per test module (tests that need
    a fresh one per test override this fixture)."""
    from calplug.testing import tiny_llava

    return tiny_llava(seed=0).train()


@pytest.fixture(params=["git", "python"])
def engine(request, monkeypatch):
    """Run a patch test with ``git apply`` and with the Python fallback (as if no git on PATH)."""
    from calplug import patching

    if request.param == "python":
        monkeypatch.setattr(patching, "_git", lambda: None)
    elif patching._git() is None:
        import _skips

        _skips.missing("git", "git is not installed: the Python patch engine is tested alone "
                              "(apt-get install git)")
    return request.param
