"""Type stubs for the compiled extension ``tiergate._core`` (rust_core/py)."""

__version__: str
DEFAULT_MAX_TEXT_BYTES: int

class TiergateError(ValueError):
    """Base class of every error raised by tiergate's Rust tiers."""

class ConfigError(TiergateError):
    """A rule file, model parameter or other configuration is invalid."""

class InputError(TiergateError):
    """A request input is invalid (empty or oversized text, bad vector, unknown id, ...)."""

class FormatError(TiergateError):
    """A file is truncated, corrupt, or of an unsupported format version."""

# ---------------------------------------------------------------- rules tier

# ---------------------------------------------------------- hashed linear tier

# ------------------------------------------------------------ semantic cache tier
