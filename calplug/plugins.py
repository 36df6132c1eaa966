"""The one pluggy `PluginManager` of calplug.

Built-in plugins are module paths registered exactly like external ones; third-party plugins are
found through the ``calplug`` entry-point group (set ``CALPLUG_DISABLE_ENTRYPOINTS=1`` to skip
them). ``check_pending()`` makes a misspelt ``calplug_*`` hook fail loudly at load time.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

import pluggy

from . import hookspecs

BUILTIN_PLUGINS = (
    "calplug.builtin",
    "calplug.integrations.transformers_llava",
    "calplug.integrations.transformers_qwen_vl",
    "calplug.integrations.llava_style",
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


def contrasts() -> dict[str, Callable]:
    """All registered contrast conditions, later-registered plugins overriding earlier ones."""
    merged: dict[str, Callable] = {}
    for table in reversed(get_plugin_manager().hook.calplug_contrasts()):
        merged.update(table or {})
    return merged


def contrast_names() -> list[str]:
    return list(contrasts())


def integrations() -> list:
    """All registered integrations, later-registered (third-party) plugins first."""
    found = []
    for group in get_plugin_manager().hook.calplug_integrations():
        found.extend(group or [])
    return found
