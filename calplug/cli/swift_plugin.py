"""``calplug swift-plugin``: print the path of calplug's ms-swift plugin file, for

    swift sft ... --external_plugins "$(calplug swift-plugin)" --callbacks cal

The file lies in a folder that holds nothing else, because ms-swift puts the plugin's folder on
``sys.path``. Settings: ``$CALPLUG_CONFIG`` (docs/frameworks.md)."""
from __future__ import annotations


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    from ..frameworks import swift

    print(swift.plugin_path())
    return 0
