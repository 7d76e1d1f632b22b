"""Config loading for nemo_pp recipes: YAML + env interpolation + overrides + `_target_`.

OmegaConf does the loading and interpolation; this package
adds the NeMo AutoModel command-line forms, a "did you mean" for typos, recipe
defaults, and an enforced `_target_` allowlist checked before anything runs.

Typical recipe use::

    path, overrides = parse_cli(sys.argv[1:])
    cfg = load_config(path, overrides, defaults=RECIPE_DEFAULTS)
    validate_targets(cfg)
"""

from .cli import USAGE, parse_cli
from .errors import ConfigError
from .keys import get_dotted_keys
from .loader import load_config
from .targets import ALLOWLIST_ENV_VAR, DEFAULT_ALLOWED_PREFIXES, validate_targets

__all__ = [
    "ALLOWLIST_ENV_VAR",
    "DEFAULT_ALLOWED_PREFIXES",
    "USAGE",
    "ConfigError",
    "get_dotted_keys",
    "load_config",
    "parse_cli",
    "validate_targets",
]
