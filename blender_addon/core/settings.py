"""The add-on's settings: the protocol's settings schema (the one table of every job setting), the add-on's own
`use_advanced` switch, and the flat settings map each request carries.

Values here are the schema's own types (`texture_size` is the int 2048). Blender enums need strings, so a setting
whose choices are ints shows as a string enum: `to_blender` and `from_blender` convert at that border. Advanced
settings are sent only while `use_advanced` is on, so by default the backend runs with its checkpoint's own values.
Settings that a newer server advertises and this add-on does not know (`unknown_settings`) are shown and sent too.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..protocol.settings import SETTINGS, InvalidSettings, Schema, Setting, Value

USE_ADVANCED = Setting("use_advanced", "bool", False, "Use Advanced Settings",
                       "Send the Advanced settings (off: the backend uses its checkpoint's own values)", (), "advanced")
# Every field the add-on shows and keeps: the schema's settings, then the add-on's own switch.
FIELDS: dict[str, Setting] = {**{s.name: s for s in SETTINGS.settings}, USE_ADVANCED.name: USE_ADVANCED}


def request_fields(request: str) -> dict[str, Setting]:
    """The fields a `request` takes, in the schema's order, and the add-on's own switch (a texture operator's
    properties, say)."""
    return {name: s for name, s in FIELDS.items() if request in s.requests or s is USE_ADVANCED}


def in_section(section: str, request: str | None = None) -> tuple[Setting, ...]:
    """The fields shown in `section`, in the schema's order; with `request`, only those it takes (the add-on's
    own switch always shows)."""
    return tuple(s for s in (FIELDS if request is None else request_fields(request)).values() if s.section == section)


def defaults() -> dict[str, Value]:
    return {name: s.default for name, s in FIELDS.items()}


def resolve(values: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> dict[str, Value]:
    """Complete, checked settings: `values` over `base` (default: the built-in defaults). A bad value raises the
    schema's InvalidSettings, which names the setting and what it accepts."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise InvalidSettings(f"unknown setting(s) {', '.join(unknown)}", hint=f"Valid settings: {', '.join(FIELDS)}.")
    merged = {**(base if base is not None else defaults()), **values}
    return {name: s.check(merged[name]) for name, s in FIELDS.items()}


def request_settings(settings: Mapping[str, Value], request: str,
                     extras: Mapping[str, Value] | None = None) -> dict[str, Value]:
    """The flat settings map a `request` carries: its settings, the Advanced ones only when `use_advanced`."""
    advanced = bool(settings[USE_ADVANCED.name])
    chosen = {s.name: settings[s.name] for s in SETTINGS.for_request(request) if advanced or s.section != "advanced"}
    return {**chosen, **(extras or {})} if advanced else chosen


def to_blender(setting: Setting, value: Value) -> Value:
    """A value as its Blender property holds it (int choices become the strings of a string enum)."""
    return str(value) if setting.choices and setting.kind == "int" else value


def from_blender(setting: Setting, value: Any) -> Value:
    return int(value) if setting.choices and setting.kind == "int" else value


def unknown_settings(server: Schema, request: str) -> list[Setting]:
    """Settings a server advertises for `request` that this add-on's schema lacks (a newer backend's)."""
    return [s for s in server.for_request(request) if s.name not in FIELDS]
