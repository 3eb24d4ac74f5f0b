"""The QAT methods: the one list of them (``METHOD_CLASSES``), and their options.

Each method is a :class:`~dfqkern.qat.methods.base.Method` subclass in its own module; its
``Options`` dataclass owns its option names, defaults and checks. The engine, the CLI and the
benchmark read the list from here.
"""
from __future__ import annotations

import dataclasses

from .acq import ACQ
from .ait import AIT
from .akt import AKT
from .base import Batch, Method, StudentBatch, TeacherOutput
from .gdfq import GDFQ
from .hast import HAST
from .qimera import Qimera
from .texq import TexQ

METHOD_CLASSES: dict[str, type[Method]] = {cls.name: cls for cls in (GDFQ, Qimera, AIT, HAST, TexQ, AKT, ACQ)}
METHODS = tuple(METHOD_CLASSES)

__all__ = ["METHODS", "METHOD_CLASSES", "Batch", "Method", "StudentBatch", "TeacherOutput", "method_class",
           "method_options", "option_help", "parse_option_value"]


def method_class(name: str) -> type[Method]:
    if name not in METHOD_CLASSES:
        raise ValueError(f"method must be one of {METHODS}, got {name!r}")
    return METHOD_CLASSES[name]


def parse_option_value(field: dataclasses.Field, text: str):
    """A command-line string as the option's type (the type of its default)."""
    kind = type(field.default)
    if kind is bool:
        low = text.lower()
        if low not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"option {field.name} takes true or false, got {text!r}")
        return low in ("true", "1", "yes")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"option {field.name} takes a {kind.__name__}, got {text!r}") from None


def method_options(name: str, options: dict):
    """The method's ``Options`` built from ``options`` (values may be strings from the command line)."""
    cls = method_class(name).Options
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        raise ValueError(f"option {unknown[0]!r} is not an option of method {name!r} (its options: {known})")
    values = {k: parse_option_value(fields[k], v) if isinstance(v, str) and not isinstance(fields[k].default, str)
              else v for k, v in options.items()}
    return cls(**values)


def option_help() -> str:
    """'method: name=default, ...' for every method with options (the CLI's help)."""
    parts = []
    for name, cls in METHOD_CLASSES.items():
        opts = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls.Options))
        if opts:
            parts.append(f"{name}: {opts}")
    return "; ".join(parts)
