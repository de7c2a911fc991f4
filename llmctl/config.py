"""Recipes: dataclass defaults < YAML recipe < named flags < `key=value` overrides, typed and checked."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from llmctl.errors import ConfigError

T = TypeVar("T")


def recipes_dir() -> Path:
    """`recipes/` installed inside the package, or the repository's own when running from a checkout."""
    installed = Path(__file__).resolve().parent / "recipes"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[1] / "recipes"


def recipe_names(command: str) -> list[str]:
    return sorted(p.stem for p in (recipes_dir() / command).glob("*.yaml"))


def find_recipe(command: str, recipe: str) -> Path:
    """A short name under recipes/<command>/, or a path to a YAML file."""
    path = Path(recipe).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist.")
        return path
    named = recipes_dir() / command / f"{recipe}.yaml"
    if not named.is_file():
        names = recipe_names(command)
        close = difflib.get_close_matches(recipe, names, n=3)
        hint = f"Did you mean {', '.join(close)}?" if close else f"Recipes for {command}: {', '.join(names) or 'none'}."
        raise ConfigError(f"no recipe named {recipe!r} for `llmctl {command}` (looked in {named.parent}).", hint=hint)
    return named


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and not key.startswith("_"):
            out |= _flatten(value, name + ".")
        else:
            out[name] = value
    return out


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _key(f: dataclasses.Field) -> str:
    # A field may be spelled differently in recipes (`model.from` for the Python-safe `from_`).
    return f.metadata.get("key", f.name)


def all_keys(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every settable dotted key of a config dataclass, with its type."""
    out: dict[str, Any] = {}
    for f, hint in _fields(cls).values():
        if dataclasses.is_dataclass(hint):
            out |= all_keys(hint, f"{prefix}{_key(f)}.")
        else:
            out[f"{prefix}{_key(f)}"] = hint
    return out


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Turn a YAML or command-line value into the field's type (PyYAML reads `3e-4` as a string)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        errors = []
        for arg in args:
            try:
                return coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e.message)
        raise ConfigError(errors[0])
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(hint) or (str,)
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v]
        out = [coerce(v, inner, key) for v in items]
        return out if origin is list else tuple(out)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
        if hint is Path:
            return Path(str(value)).expanduser()
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            return hint(value)
    except (TypeError, ValueError):
        expected = getattr(hint, "__name__", str(hint))
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            expected = "one of " + ", ".join(m.value for m in hint)
        raise ConfigError(f"{key}={value!r}: expected {expected}.") from None
    return value


def _build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    kwargs = {}
    for name, (f, hint) in _fields(cls).items():
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, values, f"{prefix}{_key(f)}.")
        elif f"{prefix}{_key(f)}" in values:
            kwargs[name] = values[f"{prefix}{_key(f)}"]
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=3e-4).")
        out[key.strip()] = value
    return out


def load_recipe(
    cls: type[T],
    command: str,
    recipe: str | None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> T:
    """Resolve defaults < recipe < flags < overrides into `cls`, reporting every problem at once."""
    layers: list[tuple[str, dict[str, Any]]] = []
    if recipe:
        path = find_recipe(command, recipe)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)}).") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe is a mapping of keys, found {type(data).__name__}.")
        layers.append((str(path), _flatten(data)))
    layers.append(("flag", {k: v for k, v in (flags or {}).items() if v is not None}))
    layers.append(("override", parse_overrides(overrides or [])))

    keys = all_keys(cls)
    values: dict[str, Any] = {}
    problems = []
    for source, layer in layers:
        for key, value in layer.items():
            if key not in keys:
                close = difflib.get_close_matches(key, list(keys), n=3, cutoff=0.6)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                problems.append(f"unknown key {key!r} in {source}{hint}")
                continue
            try:
                values[key] = coerce(value, keys[key], key)
            except ConfigError as e:
                problems.append(f"{e.message} (from {source})")
    if problems:
        raise ConfigError("Bad configuration:\n  " + "\n  ".join(problems), hint="`llmctl COMMAND --help` lists the recipes; keys are dotted (optim.lr=3e-4).")
    try:
        return _build(cls, values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"Bad configuration: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as plain YAML-able values (paths and enums as strings)."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {_key(f): plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
