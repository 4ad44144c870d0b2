"""The error type for bad configuration: printed by the CLI as one line, before any work starts."""


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and the fix."""
