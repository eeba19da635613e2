"""Blender properties: the generation settings (built from `core.settings.FIELDS`, so the preferences' defaults,
the panel and the operator can never disagree), and the per-scene state: the chosen image and recent results.
"""

import json
from typing import Any

import bpy
from bpy.props import (BoolProperty, CollectionProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty,
                       StringProperty)

from ..core import settings as core_settings

MAX_RECENT = 10


def settings_annotations(options: set[str]) -> dict[str, Any]:
    """One bpy property per settings field; `options` e.g. {'SKIP_SAVE'} for operator properties."""
    props: dict[str, Any] = {}
    for f in core_settings.FIELDS.values():
        common = dict(name=f.label, description=f.description, default=f.default, options=options)
        if f.choices:
            props[f.name] = EnumProperty(items=f.choices, **common)
        elif type(f.default) is bool:
            props[f.name] = BoolProperty(**common)
        elif type(f.default) is int:
            props[f.name] = IntProperty(min=int(f.minimum), max=int(f.maximum), **common)
        else:
            props[f.name] = FloatProperty(min=f.minimum, max=f.maximum, **common)
    return props


def settings_of(holder: Any) -> dict[str, Any]:
    """The settings values of a SettingsGroup or an operator, as the flat dict `core.settings` works with."""
    return {name: getattr(holder, name) for name in core_settings.FIELDS}


class SettingsGroup(bpy.types.PropertyGroup):
    __annotations__ = settings_annotations(set())


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


CLASSES = (SettingsGroup, RecentResult, SceneState)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.trellis2 = PointerProperty(type=SceneState)


def unregister() -> None:
    del bpy.types.Scene.trellis2
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
