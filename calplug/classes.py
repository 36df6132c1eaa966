"""Matching objects by class name through the MRO, written once.

calplug recognises upstream classes (PEFT and DeepSpeed wrappers, transformers model classes, TRL
trainers) by name rather than by ``isinstance``: no upstream package has to be imported, or even
installed, to ask whether an object is one of them, and a user's subclass counts as the class it
extends.
"""
from __future__ import annotations


def class_names(obj) -> tuple[str, ...]:
    """The names of ``obj``'s class and its bases in MRO order (``obj`` itself when it is a class)."""
    cls = obj if isinstance(obj, type) else type(obj)
    return tuple(c.__name__ for c in cls.__mro__)


def is_named(obj, names) -> bool:
    """Whether any class in ``obj``'s MRO is called one of ``names``."""
    wanted = set(names)
    return any(name in wanted for name in class_names(obj))


def first_named(obj, table: dict):
    """``table[name]`` for the first class of ``obj``'s MRO whose name is a key of ``table``
    (the most specific match), or None."""
    for name in class_names(obj):
        if name in table:
            return table[name]
    return None
