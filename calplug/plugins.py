"""The one pluggy `PluginManager` of calplug.

Built-in plugins are module paths registered exactly like external ones; third-party plugins are
found through the ``calplug`` entry-point group (set ``CALPLUG_DISABLE_ENTRYPOINTS=1`` to skip
them). ``check_pending()`` makes a misspelt ``calplug_*`` hook fail loudly at load time.

`BUILTIN_PLUGINS` is the one place the core names the integrations and the framework adapters:
as module paths the manager loads when it is first built, never as imports, so the core's code
depends on none of them (docs/layout.md).
"""
from __future__ import annotations

import importlib
import os
import pluggy

from . import hookspecs
from .config import did_you_mean
from .errors import CALConfigError
from .hookspecs import Contrast, Framework, Integration

# Later-registered plugins are asked first: the generic transformers integration, which also
# matches classes no other integration names, comes first so that it is asked last.
BUILTIN_PLUGINS = (
    "calplug.integrations.transformers_vlm",
    "calplug.integrations.cross_attention",
    "calplug.integrations.encoder_decoder",
    "calplug.integrations.kosmos",
    "calplug.integrations.prefix",
    "calplug.builtin",
    "calplug.integrations.llava_style",
    "calplug.frameworks",
)

_manager: pluggy.PluginManager | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    global _manager
    if _manager is None:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        for name in BUILTIN_PLUGINS:
            pm.register(importlib.import_module(name), name=name)
        if not os.environ.get("CALPLUG_DISABLE_ENTRYPOINTS"):
            pm.load_setuptools_entrypoints(hookspecs.PROJECT)
        pm.check_pending()
        _manager = pm
    return _manager


def register(plugin: object, name: str | None = None) -> str:
    """Register a plugin object or module (for tests and scripts); returns its name."""
    pm = get_plugin_manager()
    registered = pm.register(plugin, name=name)
    pm.check_pending()
    return registered


def unregister(plugin: object | None = None, name: str | None = None) -> None:
    get_plugin_manager().unregister(plugin=plugin, name=name)


def contrasts() -> dict[str, Contrast]:
    """All registered contrast conditions by name, later-registered plugins overriding earlier
    ones."""
    merged: dict[str, Contrast] = {}
    for records in reversed(get_plugin_manager().hook.calplug_contrasts()):
        for record in _records(records, Contrast, "calplug_contrasts"):
            merged[record.name] = record
    return merged


def contrast_names() -> list[str]:
    return list(contrasts())


def resolve_contrast(name) -> Contrast:
    """The registered contrast called ``name``; a `CALConfigError` naming the registered ones
    (and the closest) otherwise. `calplug.enable` resolves the configured contrast once."""
    known = contrasts()
    if not isinstance(name, str) or name not in known:
        hint = did_you_mean(name, list(known)) if isinstance(name, str) else ""
        raise CALConfigError(
            f"contrast {name!r} is not a registered contrast condition.{hint} "
            f"Registered: {', '.join(sorted(known))}."
        )
    return known[name]


def frameworks() -> list[Framework]:
    """All registered `Framework` records (calplug's adapters and third-party ones)."""
    found: list[Framework] = []
    for records in get_plugin_manager().hook.calplug_frameworks():
        found.extend(_records(records, Framework, "calplug_frameworks"))
    return found


def integrations() -> list[Integration]:
    """All registered integrations, later-registered (third-party) plugins first."""
    found: list[Integration] = []
    for records in get_plugin_manager().hook.calplug_integrations():
        found.extend(_records(records, Integration, "calplug_integrations"))
    return found


def _records(records, kind: type, hook: str) -> list:
    """A hook's answer as a list of ``kind`` records; anything else is a plugin bug, named."""
    records = list(records or ())
    for record in records:
        if not isinstance(record, kind):
            raise CALConfigError(
                f"a {hook} implementation returned {record!r}; it must return a list of "
                f"calplug.hookspecs.{kind.__name__} records (docs/plugins.md)"
            )
    return records
