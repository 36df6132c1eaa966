"""calplug's ms-swift plugin file (calplug/frameworks/swift.py does the work):

    swift sft ... --external_plugins "$(calplug swift-plugin)" --callbacks cal

ms-swift imports this file by path and puts its folder on sys.path, which is why the folder holds
nothing else. Importing it registers the ``cal`` callback.
"""
from calplug.frameworks.swift import register

register()
