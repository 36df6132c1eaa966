"""tox's inline plugin for calplug's test matrix (tox 4 loads ``toxfile.py`` from the project root).

Why it exists: the matrix is a dozen envs, each with its own torch, transformers and framework,
and the README's ``tox`` has to install and run all of them on a 2-core machine in minutes. tox.ini
requires tox-uv, so uv creates the envs and installs into them from one shared cache (a package is
unpacked once and hard-linked into every env). This plugin does the rest:

* **uv finds what pip finds.** uv does not read pip's configuration. Where pip is configured with
  other package sources (``find-links``, ``index-url``, ``extra-index-url``, ``constraint`` in
  pip.conf or ``PIP_*``), the same values are handed to uv as ``UV_*`` variables, with pip's rule
  that every source counts the same (``UV_INDEX_STRATEGY=unsafe-best-match``). A ``UV_*`` already
  set wins. On the CI machine this is what makes ``torch==2.13.0`` the local CPU wheel rather than
  PyPI's CUDA build.
* **``tox`` runs the env list in parallel.** Bare ``tox`` (the default env list, no ``-e``, no
  ``-p``) runs as ``tox -p N`` with N = the number of CPUs, or ``CALPLUG_TOX_PARALLEL`` (1 = one
  env at a time); each env's output is shown when it finishes (``parallel_show_output``). ``tox -e
  X`` and ``tox run`` stay sequential with live output, and ``tox -p`` means what it says.
* **Each env prints its seconds.** After its commands, a line ``<env>: calplug timing: install
  ... s, commands_pre ... s, tests ... s (torch ...)`` (install = deps and calplug, from the first
  install to the first command), so CI logs say where the time goes and which torch an env got.
* **Envs can be deleted after use.** With ``CALPLUG_TOX_DISCARD_ENVS=1`` each run env's folder is
  deleted once tox has torn it down; a deleted env has no ``.tox-info.json`` left, so a later run
  recreates it. The junit results live in ``.tox/results``, outside the env folders.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from importlib import metadata

from tox.plugin import impl
from tox.tox_env.api import ToxEnv
from tox.tox_env.runner import RunToxEnv

DISCARD_VARIABLE = "CALPLUG_TOX_DISCARD_ENVS"
PARALLEL_VARIABLE = "CALPLUG_TOX_PARALLEL"

# pip option -> (uv variable, separator uv expects between several values)
PIP_TO_UV = {
    "index-url": ("UV_INDEX_URL", " "),
    "extra-index-url": ("UV_EXTRA_INDEX_URL", " "),
    "find-links": ("UV_FIND_LINKS", ","),
    "constraint": ("UV_CONSTRAINT", " "),
}
UV_SOURCE_VARIABLES = ("UV_INDEX_URL", "UV_DEFAULT_INDEX", "UV_EXTRA_INDEX_URL", "UV_INDEX", "UV_FIND_LINKS",
                       "UV_NO_INDEX", "UV_INDEX_STRATEGY")


def discard_requested() -> bool:
    """True when the environment asks for run envs to be deleted after use ("1", "true", "yes")."""
    return os.environ.get(DISCARD_VARIABLE, "").strip().lower() in {"1", "true", "yes"}


# -- uv reads pip's package sources ---------------------------------------------------------------
def pip_settings(listing: str) -> dict[str, str]:
    """The effective value of each pip option in PIP_TO_UV, from ``pip config list`` output.

    pip's own precedence: a ``PIP_*`` variable (listed as ``:env:.key``) beats the ``install``
    section, which beats ``global``; the listing has already merged the config files.
    """
    found: dict[str, dict[str, str]] = {}
    for line in listing.splitlines():
        key, sep, value = line.partition("=")
        section, dot, option = key.rpartition(".")
        if not (sep and dot) or option not in PIP_TO_UV:
            continue
        found.setdefault(option, {})[section] = " ".join(shlex.split(value))
    settings = {}
    for option, by_section in found.items():
        for section in (":env:", "install", "global"):
            if by_section.get(section):
                settings[option] = by_section[section]
                break
    return settings


def uv_variables(settings: dict[str, str]) -> dict[str, str]:
    """``UV_*`` variables that give uv the package sources ``settings`` give pip."""
    variables = {}
    for option, value in settings.items():
        name, separator = PIP_TO_UV[option]
        variables[name] = separator.join(value.split())
    if {"extra-index-url", "find-links"} & settings.keys():
        # pip takes the best candidate over all sources; uv by default stops at the first index
        # that has the package at all (which has only some transformers releases on CI's machine).
        variables["UV_INDEX_STRATEGY"] = "unsafe-best-match"
    return variables


def pip_config_listing() -> str | None:
    """``pip config list`` of the pip next to this tox, else of the ``pip`` on PATH; None if neither.

    A tox installed with pipx (or provisioned without pip) has no pip of its own; the user's pip on
    PATH then carries the configuration they install with.
    """
    candidates = [[sys.executable, "-m", "pip"]]
    if shutil.which("pip"):
        candidates.append([shutil.which("pip")])
    for pip in candidates:
        try:
            return subprocess.run([*pip, "config", "list"], capture_output=True, text=True, timeout=60,
                                  check=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}).stdout
        except (OSError, subprocess.SubprocessError):
            continue
    return None


def mirror_pip_sources() -> dict[str, str]:
    """Export pip's package sources to uv, unless uv's are already chosen; returns what was set."""
    if any(os.environ.get(name) for name in UV_SOURCE_VARIABLES):
        return {}
    listing = pip_config_listing()
    if listing is None:
        print("calplug toxfile: no pip found to read package sources from; uv uses its own "
              "(PyPI unless UV_* says otherwise)", flush=True)
        return {}
    variables = uv_variables(pip_settings(listing))
    for name, value in variables.items():
        os.environ.setdefault(name, value)
    return variables


def uv_in_use() -> bool:
    try:
        import tox_uv  # noqa: F401  (only whether tox-uv is importable)
    except ImportError:
        return False
    return True


if uv_in_use() and (MIRRORED := mirror_pip_sources()):
    print("calplug toxfile: uv uses pip's package sources: "
          + ", ".join(f"{k}={v}" for k, v in MIRRORED.items())
          + " (set UV_* yourself to choose others)", flush=True)


# -- bare `tox` runs the env list in parallel -----------------------------------------------------
def parallel_workers() -> int:
    """How many envs bare ``tox`` runs at once: ``CALPLUG_TOX_PARALLEL``, else the CPU count."""
    raw = os.environ.get(PARALLEL_VARIABLE, "").strip()
    if not raw:
        return os.cpu_count() or 1
    if not raw.isdigit() or int(raw) < 1:
        raise SystemExit(f"{PARALLEL_VARIABLE}={raw!r}: give a whole number of envs to run at once "
                         f"(1 runs them one at a time), or unset it for one per CPU")
    return int(raw)


@impl
def tox_add_core_config(core_conf, state) -> None:  # noqa: ARG001 (tox's hook signature)
    """Make bare ``tox`` (legacy command, default env list, no ``-p``) run envs in parallel."""
    options = state.conf.options
    if (getattr(options, "command", None) not in {"legacy", "le"} or getattr(options, "parallel", None) != 0
            or not getattr(getattr(options, "env", None), "is_default_list", False)):
        return  # anything but bare `tox` (or a tox whose options look different) runs as tox says
    workers = parallel_workers()
    if workers > 1:
        options.parallel = workers
        # the spinner redraws one line with "\r": garbage in a log file
        options.parallel_no_spinner = options.parallel_no_spinner or not sys.stdout.isatty()


# -- per-env timing -------------------------------------------------------------------------------
_INSTALL_STARTED: dict[str, float] = {}
_COMMANDS_STARTED: dict[str, float] = {}


@impl
def tox_on_install(tox_env: ToxEnv, arguments, section: str, of_type: str) -> None:  # noqa: ARG001
    _INSTALL_STARTED.setdefault(getattr(tox_env, "name", "?"), time.monotonic())


@impl
def tox_before_run_commands(tox_env: ToxEnv) -> None:
    _COMMANDS_STARTED[getattr(tox_env, "name", "?")] = time.monotonic()


def installed_torch(tox_env: ToxEnv) -> str:
    """The torch version installed in the env ("none" without one), read from its metadata."""
    try:
        site = [str(tox_env.env_site_package_dir())]
    except Exception:  # noqa: BLE001 (an env without a Python layout: nothing to report)
        return "?"
    found = [d.version for d in metadata.distributions(path=site) if d.metadata["Name"] == "torch"]
    return found[0] if found else "none"


@impl
def tox_after_run_commands(tox_env: ToxEnv, exit_code: int, outcomes) -> None:  # noqa: ARG001
    """Print where the env's time went: install (deps + calplug), commands_pre, tests.

    A report only: whatever goes wrong here is printed and never fails the env (an exception in a
    tox hook fails the env whose tests passed).
    """
    try:
        print(timing_line(tox_env, outcomes), flush=True)
    except Exception as error:  # noqa: BLE001
        print(f"{tox_env.name}: calplug timing: not available ({type(error).__name__}: {error})", flush=True)


def timing_line(tox_env: ToxEnv, outcomes) -> str:
    name = tox_env.name
    started = _COMMANDS_STARTED.get(name)
    install = f"{started - _INSTALL_STARTED[name]:.1f} s" if started and name in _INSTALL_STARTED else "-"
    # outcomes: commands_pre, then commands, then commands_post, one each (no retries configured)
    n_pre, n_main = len(tox_env.conf["commands_pre"]), len(tox_env.conf["commands"])
    pre = sum(o.elapsed for o in outcomes[:n_pre])
    tests = sum(o.elapsed for o in outcomes[n_pre:n_pre + n_main])
    return (f"{name}: calplug timing: install {install}, commands_pre {pre:.1f} s, tests {tests:.1f} s "
            f"(torch {installed_torch(tox_env)})")


# -- deleting envs after use ----------------------------------------------------------------------
@impl
def tox_env_teardown(tox_env: ToxEnv) -> None:
    """Delete a run env's folder once it is torn down, when ``CALPLUG_TOX_DISCARD_ENVS`` asks for it.

    Only test envs go: the packaging env (``.tox/.pkg``) builds calplug once for all of them, and
    the provisioned tox (``.tox/.tox``, tox with tox-uv) serves the next run.
    """
    if not discard_requested() or not isinstance(tox_env, RunToxEnv) or tox_env.name.startswith("."):
        return  # ".tox": the env tox provisioned itself into (tox-uv), kept for the next run
    try:
        env_dir = tox_env.env_dir
        if env_dir.is_dir():
            shutil.rmtree(env_dir, ignore_errors=True)
            print(f"{tox_env.name}: discarded {env_dir} ({DISCARD_VARIABLE} is set)", flush=True)
    except Exception as error:  # noqa: BLE001 (disk housekeeping never fails an env)
        print(f"{tox_env.name}: not discarded ({type(error).__name__}: {error})", flush=True)
