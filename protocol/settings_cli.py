"""Command-line flags built from the settings schema, for every CLI that takes job settings (`python -m backend
generate|submit|ovoxel decode`, `./trellis2 generate`): one `--pipeline-type`-style flag per setting, with the
schema's help, type, choices and default, so no CLI writes a setting, a default or a range of its own."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .settings import SETTINGS, Schema, Setting, Value


def flag(setting: Setting) -> str:
    return "--" + setting.name.replace("_", "-")


def add_setting_arguments(parser: argparse.ArgumentParser, request: str, schema: Schema = SETTINGS,
                          title: str = "job settings") -> None:
    """One flag per setting of `request`; a flag left out stays None, so the backend's own default applies."""
    group = parser.add_argument_group(title, "defaults are the official checkpoint's; a server may advertise its own")
    for s in schema.for_request(request):
        common: dict[str, Any] = dict(dest=s.name, default=None, help=f"{s.help} ({s.describe()}; default {s.default})")
        if s.kind == "bool":
            group.add_argument(flag(s), action=argparse.BooleanOptionalAction, **common)
        else:
            choices = [c.value for c in s.choices] or None
            group.add_argument(flag(s), type=s.python_type, choices=choices, metavar=s.kind.upper() if not choices
                               else None, **common)


def given_settings(args: argparse.Namespace, request: str, schema: Schema = SETTINGS) -> dict[str, Value]:
    """The settings the user gave on the command line (unchecked: the schema checks them where they are used)."""
    return {s.name: getattr(args, s.name) for s in schema.for_request(request) if getattr(args, s.name, None) is not None}


def markdown_table(schema: Schema = SETTINGS) -> str:
    """The settings as a Markdown table (the docs' settings table is this output, checked by a test)."""
    rows = ["| setting | type | default | accepts | requests | what |", "| --- | --- | --- | --- | --- | --- |"]
    for s in schema.settings:
        default = json.dumps(s.default)
        rows.append(f"| `{s.name}` | {s.kind} | `{default}` | {s.describe()} | {', '.join(s.requests)} | {s.help} |")
    return "\n".join(rows) + "\n"
