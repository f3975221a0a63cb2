"""Configs: defaults, ``parse_arg``, ``resolve()`` into a frozen ``TrialSpec``, ``ConfigError``."""

from batchbench.config.defaults import default_config, parse_arg
from batchbench.config.errors import ConfigError
from batchbench.config.resolve import NO_TARGET, OPTIMIZERS, open_workdir, resolve
from batchbench.config.spec import TrialSpec, digest

__all__ = ["ConfigError", "NO_TARGET", "OPTIMIZERS", "TrialSpec", "default_config", "digest",
           "open_workdir", "parse_arg", "resolve"]
