"""What every config key means, from the schema's descriptions: a recipe as commented YAML (``slimssl config
--explain``) and the reference page docs/config.md (``python -m slimssl.config.reference > docs/config.md``;
a test checks that the page is current)."""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from annotated_types import Ge, Gt, Le, Lt, MaxLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from .schema import Config, ViewChanges

WIDTH = 110  # of the comment lines


@dataclass(frozen=True)
class Key:
    """One setting: its dotted name, what it accepts, Config()'s default and what it does."""

    name: str
    accepts: str
    default: Any
    description: str


def sections() -> dict[str, type[BaseModel]]:
    """The sections of a recipe (``model``, ``menu``, ...), in the order a config file lists them."""
    return {name: field.annotation for name, field in Config.model_fields.items() if _is_section(field.annotation)}


def keys(section: type[BaseModel] = Config, prefix: str = "") -> list[Key]:
    """Every setting of ``section`` (by default, the whole config: its own keys, then each section's)."""
    found = []
    for name, field in section.model_fields.items():
        if _is_section(field.annotation):
            found += keys(field.annotation, f"{prefix}{name}.")
            continue
        default = field.get_default(call_default_factory=True)
        found.append(Key(prefix + name, accepts(field), _plain(default), field.description or ""))
    return found


def explained_yaml(cfg: Config) -> str:
    """``cfg`` as YAML that loads back to the same config, each key after a comment saying what it does and
    what it accepts."""
    data = cfg.model_dump(mode="json")
    described = {key.name: key for key in keys()}
    lines = [f"# {cfg.name}: every setting with what it does and accepts (docs/config.md)"]
    for top, value in data.items():
        if top not in sections():
            lines += _commented(described[top], {top: value}, "")
            continue
        lines.append(f"{top}:")
        for name, item in value.items():
            lines += _commented(described[f"{top}.{name}"], {name: item}, "  ")
    return "\n".join(lines) + "\n"


def markdown() -> str:
    """docs/config.md: a table of the settings per section, and one of the changes a ``data.views`` entry takes."""
    out = ["# Config reference", "",
           "Every setting of a recipe, by section. Generated from the schema (`src/slimssl/config/schema.py`) by "
           "`python -m slimssl.config.reference > docs/config.md`; a test checks that this page is current.", "",
           "- **Default** is the value of `slimssl.Config()`. The shipped recipes set many of them: "
           "`slimssl config --config NAME` prints a recipe resolved, and `--explain` adds these descriptions to it "
           "as comments.",
           "- Set a key in a recipe file, or for one command with `--set section.key=value` (YAML values: "
           "`--set menu.widths=[1.0,0.5]`). An unknown key or a value outside what it accepts is an error that "
           "names the key.", ""]
    by_section: dict[str, list[Key]] = {}
    for key in keys():
        by_section.setdefault(key.name.split(".")[0] if "." in key.name else "", []).append(key)
    for section, found in by_section.items():
        out += [f"## `{section}`" if section else "## Top level", ""] + _table(found, section)
    out += ["## View changes: `data.views` entries", "",
            "Each entry of `data.views` changes the augmentation recipe's views (one entry: both views; two: the "
            "first and the second). A key left out keeps the recipe's value.", ""]
    out += _table(keys(ViewChanges), "")
    return "\n".join(out)


def accepts(field: FieldInfo) -> str:
    """What ``field`` accepts, in words: its choices, or its type and bounds, and null where it may be unset."""
    return _kind(field.annotation, field.metadata)


def _kind(annotation: Any, bounds: list) -> str:
    if get_origin(annotation) is Annotated:
        inner, *extra = get_args(annotation)
        more = [m for e in extra for m in (e.metadata if isinstance(e, FieldInfo) else [e])]
        return _kind(inner, [*bounds, *more])
    if get_origin(annotation) in (Union, UnionType):
        members = [a for a in get_args(annotation) if a is not NoneType]
        written = " or ".join(_kind(a, bounds) for a in members)
        return written + (" or null" if NoneType in get_args(annotation) else "")
    if get_origin(annotation) is Literal:
        return " | ".join(str(v) for v in get_args(annotation))
    if annotation is bool:
        return "true | false"
    if annotation in (int, float):
        return ("integer" if annotation is int else "number") + _bounds(bounds)
    if annotation is str:
        return "text"
    if get_origin(annotation) is dict:
        return "mapping"
    if get_origin(annotation) is tuple:
        items = get_args(annotation)
        return f"{len(items)} {_plural(_kind(items[0], []))}"
    if get_origin(annotation) is list:
        (item,) = get_args(annotation)
        most = next((b.max_length for b in bounds if isinstance(b, MaxLen)), None)
        what = "view changes" if item is ViewChanges else _plural(_kind(item, []))
        return f"list of {what}" + (f", at most {most}" if most is not None else "")
    return getattr(annotation, "__name__", str(annotation))


def _bounds(bounds: list) -> str:
    low = next((f"{b.gt} <" for b in bounds if isinstance(b, Gt)), None) or \
        next((f"{b.ge} <=" for b in bounds if isinstance(b, Ge)), "")
    high = next((f"< {b.lt}" for b in bounds if isinstance(b, Lt)), None) or \
        next((f"<= {b.le}" for b in bounds if isinstance(b, Le)), "")
    if low and high:
        return f", {low} x {high}"
    if low:  # "0 <" read from the value's side
        number, relation = low.split(" ")
        return f" {relation.replace('<', '>')} {number}"
    return f" {high}" if high else ""


def _plural(kind: str) -> str:
    """``number > 0`` -> ``numbers > 0``: the first word made plural."""
    word, _, rest = kind.partition(" ")
    comma = "," if word.endswith(",") else ""
    plural = {"integer": "integers", "number": "numbers", "text": "texts", "list": "lists"}.get(word.rstrip(","))
    return f"{plural}{comma} {rest}".rstrip() if plural else f"({kind})"


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _plain(value: Any) -> Any:
    """A default as YAML and JSON write it (tuples as lists, models as mappings)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return json.loads(json.dumps(value))


def _commented(key: Key, entry: dict, indent: str) -> list[str]:
    comment = f"{key.description} [{key.accepts}]".lstrip()
    wrapped = textwrap.wrap(comment, WIDTH - len(indent) - 2, break_on_hyphens=False)
    body = yaml.safe_dump(entry, sort_keys=False).rstrip("\n")  # as Config.to_yaml writes it
    return [f"{indent}# {line}" for line in wrapped] + [indent + line for line in body.splitlines()]


def _table(found: list[Key], section: str) -> list[str]:
    rows = ["| key | default | accepts | description |", "|---|---|---|---|"]
    for key in found:
        name = key.name[len(section) + 1:] if section else key.name
        cells = [f"`{name}`", f"`{json.dumps(key.default)}`", key.accepts, key.description]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")  # | would end a cell
    return rows + [""]


if __name__ == "__main__":
    print(markdown(), end="")
