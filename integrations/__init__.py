"""calplug's integrations: model knowledge, no CAL math.

This folder is the top-level ``integrations/`` of the source tree and installs as
``calplug.integrations`` (see docs/layout.md). One module per model family; each registers its
`Integration` objects through the ``calplug_integrations`` hook.
"""
