"""Command-line flags generated from settings dataclasses: a default lives in one place, and --help shows it.

    @dataclass
    class PlanOptions:
        '''...
        Attributes:
            rank: LoRA rank to plan for.
        '''
        rank: int = 16

    add_flags(parser, PlanOptions)        ->   --rank RANK   LoRA rank to plan for (default: 16)
    build(PlanOptions, parser.parse_args())   ->   PlanOptions(rank=...)

Each field becomes `--field-name` (underscores become dashes), typed from its annotation, documented by
its line in the class docstring's "Attributes:" section, with the dataclass default. A field typed
as another settings dataclass (TrainConfig.lora: LoRAConfig) adds that class's flags in an argument
group, flattened (`--rank`, not `--lora.rank`). A field's `metadata` may refine it:

    flag: the flag's name (e.g. "--prefix-init" for PrefixConfig.init)
    positional: a positional argument instead of a flag
    choices: the allowed values
    repeat: a list given by repeating the flag (`--adapter a=DIR --adapter b=DIR`), not as one list
    negate: for a bool that defaults to True, the flag that turns it off (e.g. "--no-progress"); its help
        reads "turn off <the field's doc>", so document such a field as a noun phrase
    default_help: how --help shows a default computed at run time (e.g. "$DELTAW_API_KEY")
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import re
import types
import typing
from typing import Any

_ATTRIBUTE = re.compile(r"^(\s+)([A-Za-z_][\w, ]*):\s*(.*)$")
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


class Parser(argparse.ArgumentParser):
    """argparse's parser, taking every negative number as a value: `--lr -1e-3` and `--lr -inf` reach the
    settings' own range checks (argparse alone reads only `-5` and `-.5` as numbers, and anything else
    starting with '-' as an unknown flag). Its sub-command parsers are Parsers too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its text in the Google-style docstrings of `cls` and its bases ("Attributes:" section,
    continuation lines joined; "a, b: text" documents both)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_docstring_attributes(klass.__doc__ or ""))
    return docs


def _docstring_attributes(docstring: str) -> dict[str, str]:
    docs: dict[str, str] = {}
    lines = docstring.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Attributes:"), None)
    if start is None:
        return docs
    current: list[str] = []
    indent = None
    for line in lines[start + 1:]:
        match = _ATTRIBUTE.match(line)
        if match and (indent is None or len(match[1]) == indent):
            indent = len(match[1])
            current = [name.strip() for name in match[2].split(",")]
            for name in current:
                docs[name] = match[3].strip()
        elif line.strip() and indent is not None and len(line) - len(line.lstrip()) > indent:
            for name in current:
                docs[name] += " " + line.strip()
        elif line.strip():
            break
    return docs


def _is_settings(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the non-None type of an Optional annotation, whether None was allowed)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [arg for arg in args if arg is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return annotation, False


def _scalar(annotation: Any) -> tuple[type, bool]:
    """(the element type argparse converts to, whether the field is a list)."""
    annotation, _ = _unwrap(annotation)
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (list, tuple, collections.abc.Sequence):
        return (args[0] if args and args[0] is not Ellipsis else str), True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # e.g. str | list[str]
        listed = [arg for arg in args if typing.get_origin(arg) in (list, tuple, collections.abc.Sequence)]
        return (str, True) if listed else (args[0], False)
    return annotation, False


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, prefix: str = "",
              skip: tuple[str, ...] = ()) -> None:
    """Add one argument per field of dataclass `cls` (nested settings dataclasses as argument groups)."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip or not field.init:
            continue
        annotation = hints[field.name]
        if _is_settings(annotation):
            title = field.metadata.get("group", annotation.__name__)
            group = parser.add_argument_group(title) if isinstance(parser, argparse.ArgumentParser) else parser
            add_flags(group, annotation, prefix=f"{prefix}{field.name}.")
            continue
        _add_field(parser, field, annotation, docs.get(field.name, ""), prefix)


def _add_field(parser, field: dataclasses.Field, annotation: Any, doc: str, prefix: str) -> None:
    meta, default = field.metadata, _default_of(field)
    element, is_list = _scalar(annotation)
    dest = f"{prefix}{field.name}"
    shown = meta.get("default_help", default)
    help_text = doc + ("" if default in (dataclasses.MISSING, None, False, (), []) and "default_help" not in meta
                       else f" (default: {shown})")
    kwargs: dict[str, Any] = {"help": help_text.strip().replace("%", "%%") or None, "default": argparse.SUPPRESS}
    if "choices" in meta:
        kwargs["choices"] = meta["choices"]
    if meta.get("positional"):
        kwargs.pop("default")
        if is_list:
            kwargs["nargs"] = "+"
        parser.add_argument(dest, type=element, metavar=field.name.upper(), **kwargs)
        return
    name = meta.get("flag", "--" + field.name.replace("_", "-"))
    if element is bool and not is_list:
        if default is True:
            kwargs["help"] = f"turn off {doc}".replace("%", "%%")
            parser.add_argument(meta["negate"], dest=dest, action="store_false", **kwargs)
        else:
            parser.add_argument(name, dest=dest, action="store_true", **kwargs)
        return
    if is_list:
        kwargs.update(action="append") if meta.get("repeat") else kwargs.update(nargs="+")
    if default is dataclasses.MISSING:
        kwargs["required"] = True
    metavar = meta.get("metavar", None if "choices" in meta else field.name.upper())
    parser.add_argument(name, dest=dest, type=element, metavar=metavar, **kwargs)


def build(cls: type, namespace: argparse.Namespace, prefix: str = "", **given: Any) -> Any:
    """An instance of `cls` from parsed arguments: fields the user gave, the dataclass defaults otherwise.
    `given` fills or overrides fields directly."""
    hints, values = typing.get_type_hints(cls), dict(given)
    for field in dataclasses.fields(cls):
        if field.name in values or not field.init:
            continue
        annotation, dest = hints[field.name], f"{prefix}{field.name}"
        if _is_settings(annotation):
            values[field.name] = build(annotation, namespace, prefix=f"{dest}.")
        elif hasattr(namespace, dest):
            values[field.name] = getattr(namespace, dest)
    return cls(**values)
