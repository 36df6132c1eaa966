"""Errors calplug raises. Each message names the problem and the fix."""


class CALError(Exception):
    """Base class of every calplug error."""


class CALConfigError(CALError, ValueError):
    """A configuration value or key is invalid (names the key)."""


class UnsupportedModelError(CALError, TypeError):
    """No integration recognises the model (lists the supported classes)."""


class CALInputError(CALError, ValueError):
    """A training batch cannot be weighted as given (shapes, image placeholders, ...)."""


class CALWarning(UserWarning):
    """CAL runs but probably not as meant: a training batch it can weigh but not as meant (no
    supervised token, non-finite gaps), or steps that carry images but never find an image
    position. Shown once; ``warnings.simplefilter("error", CALWarning)`` stops instead."""
