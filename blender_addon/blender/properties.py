"""Blender properties: one per setting of the settings schema (`core.settings.FIELDS`, so the preferences' defaults,
the panel and the operator can never disagree), the settings a newer server advertises that this add-on does not
know (`ExtraSetting`), and the per-scene state: the chosen image and recent results.
"""

import json
from typing import Any, Mapping

import bpy
from bpy.props import (BoolProperty, CollectionProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty,
                       StringProperty)

from ..core import settings as core_settings
from ..protocol.settings import Setting

MAX_RECENT = 10


def _property(setting: Setting, options: set[str]) -> Any:
    common = dict(name=setting.label, description=setting.help, options=options,
                  default=core_settings.to_blender(setting, setting.default))
    if setting.choices:
        items = [(str(c.value), c.label, c.help) for c in setting.choices]
        return EnumProperty(items=items, **common)
    if setting.kind == "bool":
        return BoolProperty(**common)
    if setting.kind == "int":
        return IntProperty(min=int(setting.minimum), max=int(setting.maximum), **common)
    if setting.kind == "float":
        return FloatProperty(min=setting.minimum, max=setting.maximum, **common)
    return StringProperty(**common)


def settings_annotations(options: set[str], fields: Mapping[str, Setting] = core_settings.FIELDS) -> dict[str, Any]:
    """One bpy property per settings field (default: all of them); `options` e.g. {'SKIP_SAVE'} for operator
    properties."""
    return {name: _property(setting, options) for name, setting in fields.items()}


def settings_of(holder: Any, fields: Mapping[str, Setting] = core_settings.FIELDS) -> dict[str, Any]:
    """The settings values of a SettingsGroup or an operator (of the `fields` it holds), in the schema's types."""
    return {name: core_settings.from_blender(s, getattr(holder, name)) for name, s in fields.items()}


def set_settings(holder: Any, values: Mapping[str, Any]) -> None:
    for name, value in values.items():
        setattr(holder, name, core_settings.to_blender(core_settings.FIELDS[name], value))


class SettingsGroup(bpy.types.PropertyGroup):
    __annotations__ = settings_annotations(set())


class ExtraSetting(bpy.types.PropertyGroup):
    """A setting the connected server advertises that this add-on's schema lacks. `name`: the setting's name."""

    label: StringProperty()  # type: ignore[valid-type]
    help: StringProperty()  # type: ignore[valid-type]
    kind: StringProperty()  # type: ignore[valid-type]
    bool_value: BoolProperty()  # type: ignore[valid-type]
    int_value: IntProperty()  # type: ignore[valid-type]
    float_value: FloatProperty()  # type: ignore[valid-type]
    str_value: StringProperty()  # type: ignore[valid-type]

    @property
    def value(self) -> Any:
        return getattr(self, f"{self.kind}_value")


def sync_extra_settings(state: "SceneState", unknown: list[Setting]) -> bool:
    """Offer the server's settings that this add-on lacks (new ones start at the server's default); True if the
    list changed."""
    wanted = {s.name: s for s in unknown}
    changed = False
    for index in reversed(range(len(state.extras))):
        if state.extras[index].name not in wanted:
            state.extras.remove(index)
            changed = True
    have = {item.name for item in state.extras}
    for setting in unknown:
        if setting.name not in have:
            item = state.extras.add()
            item.name, item.label, item.help, item.kind = setting.name, setting.label, setting.help, setting.kind
            setattr(item, f"{setting.kind}_value", setting.default)
            changed = True
    return changed


class RecentResult(bpy.types.PropertyGroup):
    """A finished job, re-importable from the backend's job store while the backend keeps it. `name`: the label."""

    job_id: StringProperty(name="Job")  # type: ignore[valid-type]
    settings_json: StringProperty(name="Settings")  # type: ignore[valid-type]

    @property
    def settings(self) -> dict[str, Any]:
        return json.loads(self.settings_json)


class SceneState(bpy.types.PropertyGroup):
    image_source: EnumProperty(  # type: ignore[valid-type]
        name="Source", items=[("FILE", "File", "An image file on disk"),
                              ("IMAGE", "Blender Image", "An image already loaded in Blender")], default="FILE")
    image_path: StringProperty(name="Image", subtype="FILE_PATH", description="The image to turn into an object")  # type: ignore[valid-type]
    image: PointerProperty(name="Image", type=bpy.types.Image, description="The image to turn into an object")  # type: ignore[valid-type]
    settings: PointerProperty(type=SettingsGroup)  # type: ignore[valid-type]
    extras: CollectionProperty(type=ExtraSetting)  # type: ignore[valid-type]
    defaults_loaded: BoolProperty(description="The settings were initialised from the preferences' defaults")  # type: ignore[valid-type]
    recent: CollectionProperty(type=RecentResult)  # type: ignore[valid-type]
    recent_index: IntProperty(name="Recent result", min=0)  # type: ignore[valid-type]


def remember(state: SceneState, label: str, job_id: str, settings: dict[str, Any]) -> None:
    """Add a finished job to the scene's recent results (newest first, at most MAX_RECENT)."""
    item = state.recent.add()
    item.name, item.job_id, item.settings_json = label, job_id, json.dumps(settings)
    state.recent.move(len(state.recent) - 1, 0)
    while len(state.recent) > MAX_RECENT:
        state.recent.remove(len(state.recent) - 1)
    state.recent_index = 0


CLASSES = (SettingsGroup, ExtraSetting, RecentResult, SceneState)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.trellis2 = PointerProperty(type=SceneState)


def unregister() -> None:
    del bpy.types.Scene.trellis2
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
