"""The configuration reference (``docs/configuration.md``), generated from the settings models.

``ihc-adapter config reference`` prints it; a test keeps the committed file equal to what this
module generates, so the reference cannot drift from the code. Every field's table row gives its
dotted name, type, default and the description written on the field itself.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any

from pydantic import BaseModel

from config.service import ENV_PREFIX, ServiceConfig
from config.settings import PROFILE_DIR, Settings, available_profiles

_INTRO = """# Configuration reference

Generated from the settings models by `ihc-adapter config reference` (`config/reference.py`); do
not edit by hand: a test compares this file with the generator's output.

There are two configurations:

* **Scoring settings** (`config/settings.py`, one frozen model): what the pipeline reads. A
  *profile* ({profiles}: `config/profiles/*.toml`, or a `.toml` of your own) sets some of them;
  `--set section.key=value` (JSON values) overrides any of them on the command line, and
  `scoring.overrides` does so in the service's file. A value out of range is refused with one
  line naming the setting and the value.
* **Service configuration** (`config/service.py`): the service's TOML file (`ihc-adapter serve
  --config adapter.toml`), each key also settable from the environment as
  `{env}SECTION__KEY` (JSON values). `ihc-adapter config check FILE` validates a file and
  prints the effective configuration.
"""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "Path": "path"}.get(
            annotation.__name__, annotation.__name__
        )
    return str(annotation).replace("typing.", "")


def _default(value: Any) -> str:
    if isinstance(value, BaseModel):
        return ""
    try:
        text = json.dumps(value, default=str)
    except TypeError:
        text = str(value)
    return f"`{text}`"


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows: list[str] = []
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if _is_model(annotation):
            nested.append((f"{prefix}{name}", annotation))  # type: ignore[arg-type]
            continue
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) is tuple and args and _is_model(args[0]):
            nested.append((f"{prefix}{name}[]", args[0]))
            continue
        optional = (
            [a for a in args if _is_model(a)]
            if typing.get_origin(annotation) in (typing.Union, types.UnionType)
            else []
        )
        if optional:
            description = (field.description or "").replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | section or null | `null` | {description} |")
            nested.append((f"{prefix}{name}", optional[0]))
            continue
        default = "required" if field.is_required() else _default(field.get_default(call_default_factory=True))
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{prefix}{name}` | {_type_name(annotation)} | {default} | {description} |")
    out: list[str] = []
    if rows:
        doc = (model.__doc__ or "").strip().splitlines()
        title = prefix.rstrip(".") or "(top level)"
        out += [f"### `{title}`", ""]
        if doc and not doc[0].startswith("Everything") and model.__doc__ != BaseModel.__doc__:
            out += [doc[0], ""]
        out += ["| setting | type | default | meaning |", "|---|---|---|---|", *rows, ""]
    for name, sub in nested:
        out += _rows(sub, f"{name}.")
    return out


def reference() -> str:
    """The whole reference as Markdown."""
    profiles = ", ".join(f"`{p}`" for p in available_profiles())
    lines = [_INTRO.format(profiles=profiles, env=ENV_PREFIX), "## Scoring settings", ""]
    lines += _rows(Settings, "")
    lines += ["## Profiles", "", "What each profile sets (on top of the defaults above):", ""]
    for name in available_profiles():
        lines += [f"### `{name}`", "", "```toml", (PROFILE_DIR / f"{name}.toml").read_text().strip(), "```", ""]
    lines += ["## Service configuration", ""]
    lines += _rows(ServiceConfig, "")
    return "\n".join(lines).rstrip() + "\n"
