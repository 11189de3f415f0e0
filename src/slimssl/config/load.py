"""Reading configs: a recipe file or a shipped recipe's name, ``--set KEY=VALUE`` overrides, and pydantic's
errors turned into one :class:`ConfigError` that names the file and the key."""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from ..wording import did_you_mean, on_command_line, overrides_named
from ..errors import short_repr
from ..layout import CONFIG, PACKAGED, packaged_configs
from .schema import Config, ConfigError


def find_config(name: str | Path) -> Path:
    """A config path as given, or the name of one shipped with slimssl (``demo`` or ``demo.yaml``)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped_name = path.name if path.suffix else f"{path.name}.yaml"
    # by its exact name: a case-insensitive file system (macOS, Windows) would also find DEMO.yaml
    shipped = PACKAGED / shipped_name if shipped_name in packaged_configs() else None
    if path.is_dir() and not (str(name) == path.name and shipped):
        run = path / CONFIG
        hint = f"; a run's config is {run}" if run.is_file() else ""
        raise ConfigError(f"config {str(name)!r} is a directory; expected a YAML file or the name of a shipped config "
                          f"({', '.join(packaged_configs())}){hint}")
    # a bare shipped name that is also a folder here (`--out demo` makes one) is the shipped config: a folder
    # is never a config file. A name with a folder is a path: `configs/demo.yaml` missing from here is not the
    # shipped demo (an edited copy looked for in the wrong place would train the stock recipe without a word)
    if shipped and str(name) == path.name:
        return Path(str(shipped))
    hint = f" (the shipped one of that name is {path.name if path.suffix else shipped.stem!r}, without a folder)" \
        if shipped else ""
    if not hint and str(name) == path.name:  # a bare name; a path is the user's file, not a shipped one misspelt
        hint = did_you_mean(path.stem, [known.removesuffix(".yaml") for known in packaged_configs()])
    raise ConfigError(f"config file {str(name)!r} does not exist{hint}; shipped configs: "
                      f"{', '.join(packaged_configs())}")


def check_assignment(assignment: str) -> None:
    """An override must read KEY=VALUE; a word without ``=`` is most often a positional argument after --set."""
    if "=" in assignment:
        return
    if on_command_line():
        raise ConfigError(f"--set expects KEY=VALUE, got {assignment!r} (--set takes every word up to the next "
                          "flag: put a run directory or other positional argument before --set)")
    raise ConfigError(f"overrides are 'KEY=VALUE' strings such as 'train.epochs=5', got {assignment!r}")


def _override() -> str:
    """How messages name an override: by its flag on the command line, by its keyword in Python."""
    return "--set" if on_command_line() else "override"


def apply_override(data: dict, assignment: str) -> None:
    """Apply ``section.key=value`` to a raw config dict; the value is read as YAML (numbers, lists...)."""
    check_assignment(assignment)
    key, raw = assignment.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"{_override()} {assignment!r}: expected KEY=VALUE with a dotted key such as train.epochs")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{_override()} {key}: {part!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{_override()} {key}: the value {raw!r} is not valid YAML ({_yaml_problem(e)}); expected "
                          "e.g. 5, 0.1, true, cosine or [1.0, 0.5]") from None


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong, and where."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


def _format_errors(err: ValidationError, source: str, set_keys: set[str], file_valid: bool = False) -> str:
    """The errors one per line, each key given by an override marked; ``file_valid``: the config was valid
    before the overrides, which are then the invalid part, whatever the lines name."""
    marker = f" [from {'--set' if on_command_line() else 'overrides='}]"

    def from_set(key: str) -> str:
        # a key given by an override, inside one (data.std.1 of data.std=...) or above one (trian of trian.epochs)
        return marker if any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in set_keys) else ""

    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        by_set = from_set(key)
        if e["type"] == "extra_forbidden":
            fields = list(_section_at(e["loc"][:-1]).model_fields)
            close = difflib.get_close_matches(str(e["loc"][-1]), fields, n=1)
            hint = f" (did you mean {'.'.join([*map(str, e['loc'][:-1]), close[0]])}?)" if close else ""
            lines.append(f"  {key}: unknown key{by_set}{hint} (allowed here: {', '.join(fields)})")
        elif e["type"] == "value_error":  # a check of a section, or across sections (the menu against the model)
            message = e["msg"].removeprefix("Value error, ")
            named = message.partition(": ")[0]  # these messages begin with the key they are about
            if e["loc"] and "." not in named and re.fullmatch(r"\w+", named):  # within a listed section (data.views.0)
                message, named = f"{key}.{message}", f"{key}.{named}"
            lines.append(f"  {message}" + (from_set(named) if re.fullmatch(r"[\w.]+", named) else ""))
        else:
            lines.append(f"  {key}: {e['msg']} (got {short_repr(e.get('input'))}){by_set}")
    if file_valid or all(marker in line for line in lines):
        # the file is fine: its name first would make it sound damaged
        # (pretrain's --data, --epochs, --batch-size, --device and --seed are overrides too)
        return f"invalid {overrides_named()} for the config of {source}:\n" + "\n".join(lines)
    return f"invalid config {source}:\n" + "\n".join(lines)


def _section_at(loc: tuple) -> type[BaseModel]:
    """The section (a pydantic model) that the error location ``loc`` points into: ``("data", "views", 0)``
    is a :class:`ViewChanges`."""
    section: Any = Config
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = section.model_fields[part].annotation
        models = [a for a in (annotation, *get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)]
        section = models[0] if models else section
    return section


def config_from_dict(data: dict[str, Any], source: str = "<dict>", overrides: Sequence[str] | None = None, *,
                     stored: bool = False) -> Config:
    """A checked Config from ``data`` with ``overrides`` applied. ``stored``: accept a ``method.name`` and a
    ``slim.loss_weights`` that are not registered in this process (a checkpoint's config, read for its backbone:
    evaluation and export need neither; training with it then names what is missing)."""
    given = data or {}
    _check_size(given, source)  # before anything walks it
    data = copy.deepcopy(given)  # overrides write into nested sections: never into the caller's dict
    check_overrides(overrides)
    for assignment in overrides or []:
        apply_override(data, assignment)
    try:
        return Config.model_validate(data, context={"stored": stored})
    except ValidationError as e:
        set_keys = {a.split("=", 1)[0].strip() for a in overrides or []}
        raise ConfigError(_format_errors(e, source, set_keys, bool(overrides) and _valid(given, stored))) from None


MAX_CONFIG_VALUES, MAX_CONFIG_DEPTH = 100_000, 32  # a recipe holds a few hundred values, 4 levels deep


def _check_size(data, source: str) -> None:
    """Refuse a config of more values or deeper than any config (in a YAML file whose aliases nest, or a pickle
    whose lists share one another, a few hundred bytes hold billions of values, which validating would walk)."""
    count, stack = 0, [(data, 0)]
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES or depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{source} holds more than {MAX_CONFIG_VALUES} values or nests deeper than "
                              f"{MAX_CONFIG_DEPTH} levels; a slimssl config holds a few hundred, 4 levels deep")
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for pair in value.items() for item in pair)
        elif isinstance(value, (list, tuple)):
            stack.extend((item, depth + 1) for item in value)


def _valid(data: dict, stored: bool) -> bool:
    try:
        Config.model_validate(data, context={"stored": stored})
    except ValidationError:
        return False
    return True


def check_overrides(overrides) -> None:
    """``overrides`` must be a list of "KEY=VALUE" strings: a str would be read letter by letter, and a dict
    by its keys only."""
    if isinstance(overrides, (str, dict)):
        example = [f"{k}={v}" for k, v in overrides.items()][:2] if isinstance(overrides, dict) else [overrides]
        raise ConfigError(f"overrides must be a list of 'KEY=VALUE' strings such as {example!r}, got the "
                          f"{type(overrides).__name__} {overrides!r}")


def load_config(path: str | Path | None = None, overrides: Sequence[str] | None = None, *,
                stored: bool = False) -> Config:
    """Load a YAML recipe (a path or a shipped name; default ``demo``) and apply ``overrides``. ``stored``: the
    file is a run's config.yaml, read as ``config_from_dict(..., stored=True)`` reads a checkpoint's config."""
    check_overrides(overrides)  # before the file is read: the mistake is in the call
    file = find_config(path or "demo")
    try:
        data = yaml.load(file.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {file} is not valid YAML: {_yaml_problem(e)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {file} is not text (not UTF-8); expected a YAML file") from None
    if data is None:  # an empty file would silently train every default
        raise ConfigError(f"config file {file} is empty; expected a mapping of sections "
                          f"({', '.join(Config.model_fields)})")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {file} must hold a mapping of sections, got {type(data).__name__}")
    shipped = file.parent == Path(str(PACKAGED))
    return config_from_dict(data, f"{file.name} (shipped)" if shipped else str(file), overrides, stored=stored)
