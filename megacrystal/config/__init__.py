"""Typed run configuration: schema, YAML loading, dotted overrides, ConfigError."""
from .errors import ConfigError
from .loader import apply_overrides, config_from_dict, dump_config, load_config, read_yaml
from .schema import Config

__all__ = ["Config", "ConfigError", "apply_overrides", "config_from_dict", "dump_config", "load_config"]
