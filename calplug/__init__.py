"""calplug: Contrastive ALignment (CAL, NeurIPS 2024) as a plugin for vision-language training.

    import calplug
    calplug.enable(model)                  # this instance's training forward returns the CAL loss
    calplug.enable(model, contrast="mask") # the published algorithm (see CALConfig.faithful())
    calplug.disable(model)                 # the original forward, exactly
    print(calplug.verify(model, batch))    # the family tests' checks on your model (docs/verify.md)
    calplug.token_gaps(model, batch)       # how much the image raised each token, no training
    calplug.contrastive_generate(model, **inputs)  # decoding contrasted with the image-blind pass
    calplug.audit(model, "data.json", processor=processor)  # which samples the image supports (docs/audit.md)
"""
from .config import CALConfig, resolve_config
from .errors import CALConfigError, CALError, CALInputError, CALSampleError, CALWarning, UnsupportedModelError
from .hookspecs import hookimpl
from .enabling import config_of, disable, enable, enable_for_stage, enabled, is_enabled
from .scoring import TokenGaps, token_gaps
from .decoding import contrastive_decoding, contrastive_generate
from .verifying import verify
from .auditing import audit, audit_batch

__version__ = "0.1.0"

__all__ = [
    "audit", "audit_batch", "CALConfig", "CALConfigError", "CALSampleError", "CALError", "CALInputError", "CALWarning", "UnsupportedModelError",
    "config_of", "disable", "enable", "enable_for_stage", "enabled", "hookimpl", "is_enabled", "resolve_config",
    "TokenGaps", "token_gaps", "verify", "contrastive_decoding", "contrastive_generate",
]
