"""Typed, documented config fields: the one place a field is defined.

A config *section* is a dataclass whose fields are declared with ``setting``: type (the
annotation), default, a one-line doc and its checks, side by side (TRL's style). A section may
add rules that span several of its fields with ``cross_checks``. Everything else is derived:
``GRPOConfig``'s defaults and fluent setters, the YAML keys a run config accepts, validation,
``opefo config``'s listing and the field table of docs/configuration.md.

    @dataclasses.dataclass
    class MySection:
        '''What the section is for.'''
        my_knob: float = setting(0.5, "what it does", low=0.0, high=1.0)

    register_section("my_section", MySection, setter="my_section")

Pure Python: no Ray, no torch.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
import types
import typing
from typing import Any, Callable, Iterable, Iterator, Sequence

__all__ = [
    "ConfigError",
    "FieldSpec",
    "Section",
    "setting",
    "register_section",
    "SECTIONS",
    "all_fields",
    "check_value",
    "coerce_value",
    "validate_sections",
    "markdown_table",
]


class ConfigError(ValueError):
    """A bad config value or key; the message names the field (or key) and why."""


def setting(default: Any, doc: str, *, choices: Callable[[], Iterable[Any]] | Sequence[Any] | None = None,
            low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
            check: Callable[[Any], str | None] | None = None) -> Any:
    """A dataclass field with its doc and checks.

    Args:
        default: the default value; a dict or list default is copied for each instance (and for
            each reader of ``FieldSpec.default``), so no caller can change it for the others.
        doc: one line: what the field does (shown by ``opefo config`` and the table of docs/configuration.md).
        choices: allowed values, or a callable returning them (for registries that grow).
        low, high: numeric bounds (inclusive unless ``low_open`` / ``high_open``); None passes.
        check: extra rule ``value -> error text | None``.
    """
    meta = {"doc": doc, "choices": choices, "low": low, "high": high, "low_open": low_open,
            "high_open": high_open, "check": check}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=functools.partial(copy.deepcopy, default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One config field, as derived from its section."""

    name: str
    section: str
    type: Any
    default: Any
    doc: str
    meta: dict

    def choices(self) -> tuple | None:
        c = self.meta.get("choices")
        if c is None:
            return None
        return tuple(c() if callable(c) else c)

    def type_name(self) -> str:
        return _type_name(self.type)


@dataclasses.dataclass
class Section:
    """A registered section: its name, dataclass, fluent setter name and doc."""

    name: str
    cls: type
    setter: str
    doc: str
    aliases: dict[str, str]

    def fields(self) -> list[FieldSpec]:
        hints = typing.get_type_hints(self.cls)
        specs = []
        for f in dataclasses.fields(self.cls):
            if "doc" not in f.metadata:
                raise TypeError(f"{self.cls.__name__}.{f.name} is not declared with setting(...)")
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            specs.append(FieldSpec(f.name, self.name, hints[f.name], default, f.metadata["doc"], dict(f.metadata)))
        return specs

    def cross_checks(self, config: Any) -> Iterator[tuple[str, str]]:
        """(field, why) for each broken rule across fields (the dataclass's ``cross_checks``)."""
        rules = getattr(self.cls, "cross_checks", None)
        return rules(config) if rules else iter(())


SECTIONS: dict[str, Section] = {}


def register_section(name: str, cls: type, *, setter: str | None = None,
                     aliases: dict[str, str] | None = None) -> type:
    """Add a section of fields to GRPOConfig / OPEFOConfig (and so to YAML and ``opefo config``).

    ``setter`` names the fluent method that sets its fields (default: the section's name);
    several sections may share one setter. ``aliases`` map setter keywords to field names.
    """
    if name in SECTIONS:
        raise ValueError(f"config section {name!r} is already registered")
    taken = {f.name: s.name for s in SECTIONS.values() for f in s.fields()}
    section = Section(name, cls, setter or name, (cls.__doc__ or "").strip().splitlines()[0], dict(aliases or {}))
    for f in section.fields():
        if f.name in taken:
            raise ValueError(f"config field {f.name!r} of section {name!r} is already in section {taken[f.name]!r}")
    SECTIONS[name] = section
    return cls


def all_fields() -> dict[str, FieldSpec]:
    """Every field of every registered section, by name, in section order."""
    return {f.name: f for s in SECTIONS.values() for f in s.fields()}


# ---------------------------------------------------------------------------- types and checks

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"tuple[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if origin is dict:
        return "dict"
    return getattr(tp, "__name__", str(tp))


def _fail(name: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"config field {name!r} = {value!r}: {why}")


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _matches(tp: Any, value: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(a, value) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is Any:
        return True
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is tuple:
        args = typing.get_args(tp)
        return isinstance(value, tuple) and len(value) == len(args) and all(_matches(a, v) for a, v in zip(args, value))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return isinstance(value, tp)


def coerce_value(spec: FieldSpec, value: Any) -> Any:
    """What a YAML or command-line value means for this field's type: a list for a tuple field
    becomes a tuple; YAML 1.1 reads ``5e-4`` (no dot) as a string, a float field means the number."""
    union = typing.get_origin(spec.type) in (typing.Union, types.UnionType)
    args = typing.get_args(spec.type) if union else (spec.type,)
    if isinstance(value, list) and any(typing.get_origin(a) is tuple for a in args):
        return tuple(float(v) if isinstance(v, str) and _FLOAT.match(v.strip()) else v for v in value)
    if isinstance(value, str) and float in args and str not in args and _FLOAT.match(value.strip()):
        return float(value)
    return value


def check_value(spec: FieldSpec, value: Any) -> None:
    """Raise ConfigError naming the field if ``value`` breaks its type or checks."""
    if not _matches(spec.type, value):
        raise _fail(spec.name, value, f"must be of type {spec.type_name()}")
    if value is None:
        return
    choices = spec.choices()
    if choices is not None and value not in choices:
        raise _fail(spec.name, value, f"choose one of {sorted(choices, key=str)}")
    m = spec.meta
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise _fail(spec.name, value, "must be a finite number")
        lo, hi = m.get("low"), m.get("high")
        if lo is not None and (value < lo or (m.get("low_open") and value == lo)):
            raise _fail(spec.name, value, f"must be {'>' if m.get('low_open') else '>='} {lo}")
        if hi is not None and (value > hi or (m.get("high_open") and value == hi)):
            raise _fail(spec.name, value, f"must be {'<' if m.get('high_open') else '<='} {hi}")
    if m.get("check") is not None:
        why = m["check"](value)
        if why:
            raise _fail(spec.name, value, why)


def validate_sections(config: Any) -> None:
    """Check every field of ``config`` (any object with the fields as attributes), then each
    section's ``cross_checks(config)`` rules; the first failure raises ConfigError."""
    for spec in all_fields().values():
        check_value(spec, getattr(config, spec.name))
    for section in SECTIONS.values():
        for name, why in section.cross_checks(config):
            raise _fail(name, getattr(config, name, None), why)


def markdown_table(sections: Iterable[Section]) -> str:
    """The field table of docs/configuration.md: one row per field (section, field, type, default, doc)."""
    rows = ["| section | field | type | default | meaning |", "|---|---|---|---|---|"]
    for section in sections:
        for f in section.fields():
            doc = f.doc.replace("|", "\\|")
            rows.append(f"| {section.name} | `{f.name}` | {f.type_name().replace('|', chr(92) + '|')} "
                        f"| `{f.default!r}` | {doc} |")
    return "\n".join(rows)
