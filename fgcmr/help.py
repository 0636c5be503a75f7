"""``--help`` text, written from the code itself so it cannot drift from it.

An option's description is the comment on its line in the config dataclass (or command signature),
else the first sentence of the comment lines just above it: the one place a field is explained. A
description that names ``configs/<kind>/<name>.<ext>`` lists the names found there as the choices
(``configs/<kind>/*.<ext>``: the files, for options that take a path).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import typing
from typing import Any, Callable

from fgcmr.config import CONFIGS

NAMED = re.compile(r"configs/(\w+)/(<name>|\*)(\.\w+)")  # <name>: choices by name; *: as paths


def notes(obj: Any) -> dict[str, str]:
    """``{field or parameter name: one-line description}`` from the source comments of a class (and its bases)
    or a function; names without a comment are absent."""
    found: dict[str, str] = {}
    for part in reversed(obj.__mro__[:-1]) if isinstance(obj, type) else [inspect.unwrap(obj)]:
        try:
            source = textwrap.dedent(inspect.getsource(part))
        except (OSError, TypeError):
            continue
        found.update(_source_notes(source))
    return found


def _source_notes(source: str) -> dict[str, str]:
    comments = {
        t.start[0]: t.string.lstrip("#").strip()
        for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if t.type == tokenize.COMMENT
    }
    lines = source.splitlines()
    node = ast.parse(source).body[0]
    if isinstance(node, ast.ClassDef):  # a field's comment may sit on any of its lines (a wrapped default)
        items = [
            (n.target.id, n.lineno, range(n.lineno, n.end_lineno + 1))
            for n in node.body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
        ]
    else:  # a parameter's comment is on its line, when the line holds no other parameter
        a = node.args  # type: ignore[attr-defined]
        params = [*a.posonlyargs, *a.args, *a.kwonlyargs]
        starts = [p.lineno for p in params]
        items = [(p.arg, p.lineno, range(p.lineno, p.lineno + (starts.count(p.lineno) == 1))) for p in params]
    out = {}
    for name, first, span in items:
        note = next((comments[i] for i in span if i in comments and not _is_comment(lines[i - 1])), "")
        above, i = [], first - 1
        while i >= 1 and _is_comment(lines[i - 1]):
            above.insert(0, comments[i])
            i -= 1
        if not note and above:
            note = re.split(r"(?<=\.)\s+(?=[A-Z])", " ".join(above), maxsplit=1)[0]
        if note and not note.startswith("noqa"):
            out[name] = note
    return out


def _is_comment(line: str) -> bool:
    return line.lstrip().startswith("#")


@dataclasses.dataclass(frozen=True)
class Option:
    flag: str  # --flag, dotted for nested configs
    kind: str  # type, or "choice"
    default: Any
    note: str  # "" when undocumented
    choices: tuple[str, ...] = ()


def config_options(cls: type, prefix: str = "") -> list[Option]:
    """Every option of a config dataclass, nested sections flattened as ``section.name``."""
    hints, described, out = typing.get_type_hints(cls), notes(cls), []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += config_options(tp, f"{prefix}{f.name}.")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        out.append(_option(f"{prefix}{f.name}", tp, default, described.get(f.name, "")))
    return out


def signature_options(fn: Callable) -> list[Option]:
    """The options of a command written as a plain function (its named parameters)."""
    hints, described = typing.get_type_hints(inspect.unwrap(fn)), notes(fn)
    out = []
    for p in inspect.signature(fn).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        default = "(required)" if p.default is p.empty else p.default
        out.append(_option(p.name, hints.get(p.name, Any), default, described.get(p.name, "")))
    return out


def _option(flag: str, tp: Any, default: Any, note: str) -> Option:
    if typing.get_origin(tp) is typing.Literal:
        return Option(flag, "choice", default, note, tuple(map(str, typing.get_args(tp))))
    named = NAMED.search(note) if str in (tp, *typing.get_args(tp)) else None
    choices = ()
    if named:
        found = sorted((CONFIGS / named[1]).glob(f"*{named[3]}"))
        choices = tuple(p.stem if named[2] == "<name>" else f"configs/{named[1]}/{p.name}" for p in found)
    kind = getattr(tp, "__name__", str(tp)).replace("typing.", "")
    return Option(flag, kind, default, note, choices)


def config_files(kind: str) -> list[str]:
    """The shipped ``configs/<kind>/*.yaml`` files, as a user would pass them to ``--config``."""
    return sorted(f"configs/{kind}/{p.name}" for p in (CONFIGS / kind).glob("*.yaml"))


def render_options(options: list[Option]) -> list[str]:
    def left(o: Option) -> str:
        shown = "required" if o.default == "(required)" else f"default {o.default!r}"
        return f"--{o.flag}  [{o.kind}, {shown}]"

    width = min(max(len(left(o)) for o in options), 60) if options else 0
    lines = []
    for o in options:
        note = o.note + (f"; one of: {', '.join(o.choices)}" if o.choices else "")
        lines.append(f"  {left(o):<{width}}  {note}".rstrip())
    return lines


def render_group(title: str, doc: str, members: dict[str, Any]) -> str:
    """A group's help: its line, then each subcommand with the first line of its docstring."""
    width = max(map(len, members))
    rows = [f"  {name:<{width}}  {first_line(obj)}" for name, obj in members.items()]
    return "\n".join(
        [f"{title}: {doc}" if doc else title, "", "Commands:", *rows, "", f"{title} <command> --help: its options."]
    )


def first_line(obj: Any) -> str:
    """The first paragraph of ``obj``'s docstring, as one line."""
    return " ".join((inspect.getdoc(obj) or "").split("\n\n")[0].split())
