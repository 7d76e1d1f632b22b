"""Config loading for nemo_pp recipes: YAML + env interpolation + overrides + `_target_`.

OmegaConf does the loading and interpolation, Hydra the override grammar and the
instantiation; this package adds NeMo AutoModel's `--a.b value` spelling, a "did you
mean" for typos, defaults merged under the YAML, and an enforced `_target_` allowlist
checked before anything runs; typed schemas (:mod:`nemo_pp.config.typed`). The recipe's schema: :mod:`nemo_pp.planning.schema`.

Typical recipe use::

    path, overrides = parse_cli(sys.argv[1:])
    cfg = load_recipe_config(path, overrides)  # nemo_pp.planning.schema: load_config + schema + validate_targets
    model = instantiate(cfg.model)
    optimizer = instantiate(cfg.optimizer, params=model.parameters())
"""

from nemo_pp.config.cli import USAGE, parse_cli
from nemo_pp.config.errors import ConfigError
from nemo_pp.config.instantiate import instantiate
from nemo_pp.config.keys import get_dotted_keys
from nemo_pp.config.loader import load_config
from nemo_pp.config.save import config_to_yaml, save_config, write_text_atomic
from nemo_pp.config.targets import ALLOWLIST_ENV_VAR, DEFAULT_ALLOWED_PREFIXES, validate_targets

__all__ = [
    "ALLOWLIST_ENV_VAR",
    "DEFAULT_ALLOWED_PREFIXES",
    "USAGE",
    "ConfigError",
    "config_to_yaml",
    "get_dotted_keys",
    "instantiate",
    "load_config",
    "parse_cli",
    "save_config",
    "write_text_atomic",
    "validate_targets",
]
