"""Typed configs: a dataclass schema (an OmegaConf structured config) checked field by field.

A schema's fields are sections and keys, each with its default. A nested dataclass is a
typed section (unknown keys are errors, with a "did you mean"); a field typed `Any` is a
free-form `_target_` section whose kwargs belong to the callable. Rules beyond the type
(bounds, choices, a required `_target_`) ride in each field's metadata via :func:`setting`;
:func:`validate_config` checks them all, in one place, naming the full key and a fix.
The recipe's own schema is :mod:`nemo_pp.planning.schema`.
"""

import dataclasses
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_pp.config.errors import ConfigError
from nemo_pp.config.keys import close_matches

__all__ = ["Rule", "schema_defaults", "setting", "validate_config"]


@dataclass(frozen=True)
class Rule:
    """Checks on a value beyond its type; null passes them where the type is Optional.

    Attributes:
        ge, gt: lower bounds for a number.
        choices: the accepted values, or a mapping from accepted spelling to the value
            stored (`{"torch.bfloat16": "bfloat16", ...}`).
        target: a free-form section that must be a mapping with a `_target_`.
        default_target: the `_target_` a mapping without one gets.
        kwargs: rules for some kwargs of a free-form section (`{"lr": Rule(ge=0)}`).
        hint: said after the rule in the error message.
    """

    ge: float | None = None
    gt: float | None = None
    choices: tuple | Mapping | None = None
    target: bool = False
    default_target: str | None = None
    kwargs: "Mapping[str, Rule]" = field(default_factory=dict)
    hint: str = ""

    def describe(self, optional: bool = False) -> str:
        """The rule in words for an error message (``">= 1, or null (hint)"``)."""
        parts = [f">= {self.ge:g}" if self.ge is not None else "", f"> {self.gt:g}" if self.gt is not None else ""]
        if self.choices is not None:
            parts.append("one of " + ", ".join(repr(c) for c in self.choices if c is not None))
        text = " and ".join(p for p in parts if p) + (", or null" if optional else "")
        return text + (f" ({self.hint})" if self.hint else "")


def setting(default: Any = None, *, factory: Any = None, **rule: Any) -> Any:
    """A dataclass field with a default (or `factory`) and a :class:`Rule` from `rule`."""
    meta = {"rule": Rule(**rule)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def schema_defaults(schema: type) -> dict:
    """The schema's defaults as plain containers."""
    return OmegaConf.to_container(OmegaConf.structured(schema))  # type: ignore[return-value]


def _unwrap_optional(tp: Any) -> tuple[bool, Any]:
    if get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp):
        return True, next(a for a in get_args(tp) if a is not type(None))
    return False, tp


def _type_name(tp: Any) -> str:
    optional, tp = _unwrap_optional(tp)
    name = tp.__name__ if get_origin(tp) is None else str(tp).replace("typing.", "")
    return f"{name} or null" if optional else name


def _invalid(key: str, value: Any, expected: str, example: Any = "VALUE") -> ConfigError:
    return ConfigError(
        f"invalid config value {key}={value!r}: must be {expected}. Fix it in the YAML or on the "
        f"command line, e.g. --{key}={'null' if example is None else example}"
    )


def _example(rule: Rule, default: Any) -> Any:
    if default is not None:
        return default
    if rule.ge is not None or rule.choices is not None:
        return rule.ge if rule.ge is not None else next(c for c in rule.choices if c is not None)
    return "VALUE"


def _check_rule(key: str, value: Any, rule: Rule, default: Any, optional: bool = False) -> Any:
    """`value` if it passes `rule`, in the spelling to store."""
    if value is None:
        return None
    if rule.ge is not None or rule.gt is not None:
        bad = not isinstance(value, (int, float)) or isinstance(value, bool)
        # Written as "not in range" so that NaN fails too.
        if bad or (rule.ge is not None and not value >= rule.ge) or (rule.gt is not None and not value > rule.gt):
            raise _invalid(key, value, ("a number " if bad else "") + rule.describe(optional), _example(rule, default))
    if rule.choices is not None:
        if value not in rule.choices:
            raise _invalid(key, value, rule.describe(optional), _example(rule, default))
        if isinstance(rule.choices, Mapping):
            return rule.choices[value]
    return value


def _fill(typed: DictConfig, node: Any, schema: type, prefix: str) -> None:
    """Check the plain, resolved `node` against `schema` and store it into `typed`."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for name in node:
        if name not in fields:
            close = close_matches(str(name), list(fields), n=1)
            raise ConfigError(
                (f"unknown key '{prefix}{name}'" if prefix else f"unknown top-level section '{name}'")
                + ": nemo_pp does not read it"
                + (f"; did you mean '{prefix}{close[0]}'?" if close else "")
                + f" (known {f'keys of {prefix[:-1]}' if prefix else 'sections'}: {', '.join(fields)})"
            )
    hints = get_type_hints(schema)
    for name, f in fields.items():
        key, value, tp = f"{prefix}{name}", node.get(name), hints[name]
        rule: Rule = f.metadata.get("rule", Rule())
        default = None if f.default is dataclasses.MISSING else f.default
        optional, inner = _unwrap_optional(tp)
        if dataclasses.is_dataclass(inner):
            if value is None and optional:
                typed[name] = None
                continue
            if not isinstance(value, dict):
                raise _invalid(key, value, "a mapping with keys " + ", ".join(x.name for x in dataclasses.fields(inner)))
            if typed[name] is None:  # an optional section the user turned on: start from its defaults
                typed[name] = OmegaConf.structured(inner)
                value = {**schema_defaults(inner), **value}
            _fill(typed[name], value, inner, f"{key}.")
        elif inner is Any:  # free-form: replaced whole, never merged with the schema's default
            if value is None and not optional:
                raise ConfigError(f"missing config section '{key}': nemo_pp needs it; add '{key}:' with a _target_ to the YAML")
            if rule.default_target and isinstance(value, dict) and "_target_" not in value:
                value = {"_target_": rule.default_target, **value}
            if rule.target and value is not None and not (isinstance(value, dict) and "_target_" in value):
                raise _invalid(key, value, "a mapping with a _target_, e.g. {_target_: package.module.Class, ...}")
            for kwarg, sub in rule.kwargs.items():
                if isinstance(value, dict) and kwarg in value:
                    _check_rule(f"{key}.{kwarg}", value[kwarg], sub, None)
            typed[name] = value
        else:
            try:
                typed[name] = value  # OmegaConf converts ("5" -> 5 for an int, 1 -> 1.0 for a float) or refuses
            except OmegaConfBaseException:
                hint = f" ({rule.hint})" if rule.hint else ""
                raise _invalid(key, value, _type_name(tp) + hint, _example(rule, default)) from None
            typed[name] = _check_rule(key, typed[name], rule, default, optional)


def validate_config(cfg: DictConfig, schema: type) -> DictConfig:
    """Check `cfg` against `schema`; return it resolved and typed (a structured config).

    `cfg` must resolve and already hold the schema's defaults (`load_config(...,
    defaults=schema_defaults(schema))`, which replaces a default `_target_` node whole
    when the YAML names another `_target_`).

    Raises:
        ConfigError: an unknown section or key (with "did you mean"), a value of the
            wrong type or out of its range, a missing or target-less `_target_` section;
            the message names the full key, the value and a fix.
    """
    typed = OmegaConf.structured(schema)
    _fill(typed, OmegaConf.to_container(cfg, resolve=True), schema, "")
    return typed

