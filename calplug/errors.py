"""Errors calplug raises. Each message names the problem and the fix."""


class CALError(Exception):
    """Base class of every calplug error."""


class CALConfigError(CALError, ValueError):
    """A configuration value or key is invalid (names the key)."""


class UnsupportedModelError(CALError, TypeError):
    """No integration recognises the model (lists the supported classes)."""


class CALInputError(CALError, ValueError):
    """A training batch cannot be weighted as given (shapes, image placeholders, ...)."""


class CALSampleError(CALInputError):
    """One sample of a data file cannot be scored (its image is missing or unreadable, it has no
    supervised token, it is longer than the model's limit, ...). `calplug.audit` records it in
    that sample's record and goes on; ``reason`` is a short key to count such samples by."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class CALWarning(UserWarning):
    """CAL runs but probably not as meant: a training batch it can weigh but not as meant (no
    supervised token, non-finite gaps), or steps that carry images but never find an image
    position. Shown once; ``warnings.simplefilter("error", CALWarning)`` stops instead."""


_WARNED: set[str] = set()   # kinds of one-time warning shown in this process


def warn_once(kind: str, message: str, category: type[Warning] = CALWarning, stacklevel: int = 3) -> None:
    """Show ``message`` the first time ``kind`` happens in this process: calplug's one warn-once
    mechanism (a bad batch, a class only matched by the generic integration, ...). When a filter
    turns the warning into an error it is raised every time: the kind is marked only once shown."""
    if kind in _WARNED:
        return
    import warnings

    warnings.warn(message, category, stacklevel=stacklevel)
    _WARNED.add(kind)


def warned(kind: str) -> bool:
    """Whether the one-time warning ``kind`` was shown in this process (checks that cost a
    synchronisation skip their work once it has been)."""
    return kind in _WARNED
