"""tox's inline plugin for calplug's test matrix (tox 4 loads ``toxfile.py`` from the project root).

Why it exists: every env of the matrix installs its own torch (~750 MB) and transformers, so the
full ``tox`` run holds about 14 GB of virtual environments at its end. A CI machine with less free
disk than that failed half way (``No space left on device`` while installing the seventh env).
With ``CALPLUG_TOX_DISCARD_ENVS=1`` (``.ci/run`` sets it) each run env's folder is deleted as soon
as tox has torn it down, so the run needs the disk of its largest env (~2.5 GB, axolotl), not of all of
them. The junit results live in ``.tox/results``, outside the env folders, so the
``support-matrix`` env still finds them. Local runs leave the variable unset and keep their envs
for fast reruns.
"""

from __future__ import annotations

import os
import shutil

from tox.plugin import impl
from tox.tox_env.api import ToxEnv
from tox.tox_env.runner import RunToxEnv

DISCARD_VARIABLE = "CALPLUG_TOX_DISCARD_ENVS"


def discard_requested() -> bool:
    """True when the environment asks for run envs to be deleted after use ("1", "true", "yes")."""
    return os.environ.get(DISCARD_VARIABLE, "").strip().lower() in {"1", "true", "yes"}


@impl
def tox_env_teardown(tox_env: ToxEnv) -> None:
    """Delete a run env's folder once it is torn down, when ``CALPLUG_TOX_DISCARD_ENVS`` asks for it.

    Only run envs go: the packaging env (``.tox/.pkg``) builds calplug once for all of them. A
    deleted env has no ``.tox-info.json`` left, so a later tox run recreates it from scratch
    instead of trusting a cache that describes packages no longer on disk.
    """
    if not discard_requested() or not isinstance(tox_env, RunToxEnv):
        return
    env_dir = tox_env.env_dir
    if env_dir.is_dir():
        shutil.rmtree(env_dir, ignore_errors=True)
        print(f"{tox_env.name}: discarded {env_dir} ({DISCARD_VARIABLE} is set)", flush=True)
