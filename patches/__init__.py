"""Patch files that turn on CAL in forks of LLaVA-style training code (installed as ``calplug.patches``).

Each ``NAME.patch`` is a plain git diff with a ``Key: value`` header naming the upstream commit it
applies to. Use them with ``calplug patch list`` / ``calplug patch apply NAME PATH`` (see
``calplug.patching``, the engine, and docs/patches.md), or with ``git apply`` directly.
"""
