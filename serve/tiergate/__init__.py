"""tiergate: a classifier inference server that answers with cheap tiers first.

The Rust tiers live in the compiled extension :mod:`tiergate._core`; this
package re-exports them so callers write ``from tiergate import RuleSet``.
"""

from tiergate._core import (
    DEFAULT_MAX_TEXT_BYTES,
    AnnIndex,
    ConfigError,
    FeatureHasher,
    FormatError,
    InputError,
    LinearModel,
    RuleMatch,
    RuleSet,
    SemanticCache,
    TiergateError,
    __version__,
)

__all__ = [
    "DEFAULT_MAX_TEXT_BYTES",
    "AnnIndex",
    "ConfigError",
    "FeatureHasher",
    "FormatError",
    "InputError",
    "LinearModel",
    "RuleMatch",
    "RuleSet",
    "SemanticCache",
    "TiergateError",
    "__version__",
]
