"""Run configs as dataclasses: defaults < YAML file < command-line overrides (torchtitan style).

A YAML file maps section names to dicts of fields; an unknown section or field is a user error, so
a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from .errors import UserError


def read_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass an existing YAML file (see configs/)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def _coerce(value, annotation):
    """Turn a command-line string into the field's type."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() in ("none", "null"):
        return None
    kinds = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    for kind in kinds:
        try:
            if kind is bool:
                if text.lower() in ("true", "1", "yes", "on"):
                    return True
                if text.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(text)
            if kind in (int, float):
                return kind(text)
            if kind is str:
                return text
        except ValueError:
            continue
    return yaml.safe_load(text)


def build(cls, data: dict, where: str):
    """Instantiate a (nested) dataclass from a dict, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise UserError(f"unknown config key '{where}{key}'; known keys: {', '.join(sorted(fields))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise UserError(f"config key '{where}{key}' must be a section (a mapping)")
            value = build(hint, value, f"{where}{key}.")
        else:
            value = _coerce(value, hint)
        kwargs[key] = value
    return cls(**kwargs)


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_overrides(pairs: list[str]) -> dict:
    """["training.lr=1e-4", "model.hidden_size=256"] -> nested dict of strings."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"override '{pair}' must look like section.key=value")
        dotted, value = pair.split("=", 1)
        node = out
        *parents, leaf = dotted.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def add_flags(overrides: dict, flags: dict) -> dict:
    """Put the command-line flags that were given (not None) into the nested overrides; flags win."""
    for section, values in flags.items():
        for key, value in values.items():
            if value is not None:
                overrides.setdefault(section, {})[key] = value
    return overrides


def load(cls, path=None, overrides: dict | None = None):
    data = read_yaml(path) if path else {}
    return build(cls, merge(data, overrides or {}), "")


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
