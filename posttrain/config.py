"""Dataclass configs, loaded from YAML files plus dotted ``key=value`` overrides.

Every stage has one config dataclass whose fields carry their documentation in
``field(metadata={"help": ...})``. Nested dataclasses are sections (``model.lora_r=16``).
An unknown key is an error that names the nearest valid key; a value of the wrong type
is an error that names the key and the expected type. YAML files are saved presets,
never code: nothing in them is imported or executed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from posttrain.log import log

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the config dataclass."""


def doc(help: str, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with its documentation attached (shown by ``--help`` and the README)."""
    kw: dict[str, Any] = {"metadata": {"help": help}}
    if default is not dataclasses.MISSING:
        kw["default"] = default
    if default_factory is not dataclasses.MISSING:
        kw["default_factory"] = default_factory
    return dataclasses.field(**kw)


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def _suggest(key: str, options: list[str]) -> str:
    near = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f" Did you mean '{near[0]}'?" if near else f" Valid keys: {', '.join(sorted(options))}."


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``, converting the few safe cases."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if _is_section(tp):
        if isinstance(value, str) and hasattr(tp, "from_string"):
            return tp.from_string(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {type(value).__name__}")
        return from_dict(tp, value, prefix=where + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # YAML reads "1e-4" as a string
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a (nested) mapping; unknown keys are errors with a suggestion."""
    hints = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in (data or {}).items():
        if key not in hints:
            raise ConfigError(f"unknown config key '{prefix}{key}'.{_suggest(key, list(fields))}")
        f = fields[key]
        if _is_section(hints[key]) and isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
            # a partial section keeps this field's own defaults (a stage may default a section
            # differently from the section class) for the keys it does not set
            defaults = {k: v for k, v in dataclasses.asdict(f.default_factory()).items()
                        if not _is_section(_field_types(hints[key])[k])}
            value = {**defaults, **value}
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field with no default was not given
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


#: The bounds :func:`check_bounds` knows, by how its messages write them.
BOUNDS = {
    ">= 0": lambda v: v >= 0,
    "> 0": lambda v: v > 0,
    ">= 1": lambda v: v >= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in (0, 1]": lambda v: 0 < v <= 1,
}


def check_bounds(cfg: Any, prefix: str = "", **rules: str) -> None:
    """A :class:`ConfigError` naming the first key of ``rules`` (``key=bound``, a key of
    :data:`BOUNDS`) whose value in ``cfg`` is out of its bound; ``prefix`` is the section."""
    for key, bound in rules.items():
        value = getattr(cfg, key)
        if not BOUNDS[bound](value):
            raise ConfigError(f"{prefix}{key} must be {bound}, got {value!r}")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _is_text(tp: Any) -> bool:
    """``tp`` is ``str`` or a section written as one string (a data source's path), or a list of them."""
    if typing.get_origin(tp) in (list, tuple):
        return all(_is_text(a) for a in typing.get_args(tp)[:1])
    return tp is str or (_is_section(tp) and hasattr(tp, "from_string"))


def _parse_value(raw: str, tp: Any, where: str) -> Any:
    """The value of ``key=raw`` for a field annotated ``tp``: text fields keep the text as written
    (YAML would read ``###`` as nothing, ``Question:`` as a mapping, ``2024-01-01`` as a date and
    ``1.10`` as 1.1); a list of text from ``[a, b]`` or ``a,b``; anything else read as YAML."""
    if raw == "":
        return ""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else ()
    if args and type(None) in args and raw.lower() in ("null", "none", "~"):
        return None
    text_tp = next((a for a in args if a is not type(None)), tp) if args else tp
    double_quoted = len(raw) >= 2 and raw[0] == raw[-1] == '"'  # (YAML reads its escapes: "\n\n")
    if _is_text(text_tp) and not double_quoted and not (typing.get_origin(text_tp) in (list, tuple)
                                                        and raw.startswith("[")):
        single_quoted = len(raw) >= 2 and raw[0] == raw[-1] == "'"
        return raw[1:-1] if single_quoted else raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: cannot read {raw!r} ({str(e).splitlines()[0]})") from None
    if double_quoted and _is_text(text_tp) and typing.get_origin(text_tp) in (list, tuple) and isinstance(value, str):
        return [value]  # one quoted item, kept whole (a list from text is otherwise split at commas)
    return value


def _set_dotted(data: dict[str, Any], cls: type, dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    node, tp = data, cls
    for i, part in enumerate(parts):
        hints = _field_types(tp)
        where = ".".join(parts[: i + 1])
        if part not in hints:
            raise ConfigError(f"unknown config key '{where}'.{_suggest(part, list(hints))}")
        if i == len(parts) - 1:
            node[part] = _parse_value(raw, hints[part], dotted)
            return
        sub = hints[part]
        if not _is_section(sub):
            raise ConfigError(f"'{where}' is not a section; cannot set '{dotted}'")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{where}' is set to {node!r}, not a section of keys; cannot set '{dotted}' "
                              f"(write it as '{where}:' with its keys indented below)")
        tp = sub


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (YAML keeps the last
    silently: a second ``data:`` section would replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base": merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"{self.name}:{key_node.start_mark.line + 1}: key {key!r} is written twice in one "
                                  f"mapping (first at line {seen[key]}); YAML would keep only the last")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """A YAML config or recipe file, with duplicate keys an error naming file and line."""
    p = Path(path)
    loader = _UniqueKeyLoader(p.read_text())
    loader.name = str(p)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    finally:
        loader.dispose()


# the recipes and stage configs shipped inside the package (the checkout's recipes/ links here)
BUNDLED_RECIPES = Path(__file__).resolve().parent / "recipes"


def config_file(path: str | Path, what: str = "config file") -> Path:
    """The YAML file ``path`` names: that file where it exists, else a bundled recipe of that
    name (``reasoning``, ``reasoning.yaml`` or ``recipes/reasoning.yaml``, so the README's
    commands work from any directory and from an installed wheel); a ConfigError naming the
    bundled ones otherwise."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    name = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    if p.parent in (Path("."), Path("recipes")) and (BUNDLED_RECIPES / name).is_file():
        if p.parent != Path(".") or p.suffix:  # (a path-like name not found here: say which file is read instead)
            log(f"{p}: not in {Path.cwd()}; reading the bundled {BUNDLED_RECIPES / name}")
        return BUNDLED_RECIPES / name
    known = ", ".join(sorted(q.stem for q in BUNDLED_RECIPES.glob("*.yaml")))
    raise ConfigError(f"{what} not found: {p} (bundled recipes, by name: {known})")


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from an optional YAML file (or bundled recipe, :func:`config_file`), then
    apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = config_file(path)
        loaded = read_yaml(p)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of config keys at the top level")
        data = loaded or {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, cls, key.strip(), raw.strip())
    return from_dict(cls, data)


def describe(cls: type, prefix: str = "", instance: Any = None) -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every key of ``cls``, sections flattened with dots.

    A section's defaults are read from the default the enclosing config gives it (a stage
    may default a section differently from the section class).
    """
    rows = []
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        if instance is not None:
            default = getattr(instance, f.name)
        if _is_section(tp):
            rows.extend(describe(tp, prefix + f.name + ".", default if dataclasses.is_dataclass(default) else None))
            continue
        tname = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        rows.append((prefix + f.name, tname, repr(default), f.metadata.get("help", "")))
    return rows


def markdown_table(rows: list[tuple[str, str, str, str]]) -> str:
    """Config keys as a Markdown table (the README's reference)."""
    out = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, help_ in rows:
        cell = default.replace("|", "\\|").replace("\n", "\\n")
        out.append(f"| `{key}` | {tp} | `{cell}` | {help_} |")
    return "\n".join(out)
