"""Layout of the settings, shared by the sidebar panel and the preferences (the same settings, the same order, all
from the settings schema's sections)."""

from __future__ import annotations

from itertools import groupby
from typing import Any

import bpy

from ..core.settings import USE_ADVANCED, in_section, request_fields
from ..protocol.settings import GENERATE, TEXTURE

HIDDEN_UNLESS = {"alpha_cutoff": ("alpha_mode", "MASK"), "remesh_band": ("remesh", True)}


def _shown(holder: Any, name: str) -> bool:
    condition = HIDDEN_UNLESS.get(name)
    return condition is None or getattr(holder, condition[0]) == condition[1]


def draw_main(layout: bpy.types.UILayout, holder: Any, seed_button: bool = False, request: str = GENERATE) -> None:
    for s in in_section("main", request):
        if s.name == "seed" and seed_button:
            row = layout.row(align=True)
            row.prop(holder, "seed")
            row.operator("trellis2.randomize_seed", text="", icon="FILE_REFRESH")
        else:
            layout.prop(holder, s.name)


def draw_asset(layout: bpy.types.UILayout, holder: Any, request: str = GENERATE) -> None:
    for s in in_section("asset", request):
        if _shown(holder, s.name):
            layout.prop(holder, s.name)


def draw_advanced(layout: bpy.types.UILayout, holder: Any, extras: Any = (), request: str = GENERATE) -> None:
    """The switch, then the advanced settings grouped by the stage they tune, then a newer server's own."""
    layout.prop(holder, USE_ADVANCED.name)
    settings = [s for s in in_section("advanced", request) if s is not USE_ADVANCED]
    for stage, group in groupby(settings, key=lambda s: s.stage):
        col = layout.column(align=True, heading=stage.replace("_", " ").title())
        col.enabled = getattr(holder, USE_ADVANCED.name)
        for s in group:
            if _shown(holder, s.name):
                col.prop(holder, s.name)
    if len(extras):
        col = layout.column(align=True, heading="From the server")
        col.enabled = getattr(holder, USE_ADVANCED.name)
        for item in extras:
            col.prop(item, f"{item.kind}_value", text=item.label)


def draw_texturing(layout: bpy.types.UILayout, holder: Any) -> None:
    """The settings only texture requests take (the others are shared with generation)."""
    for s in request_fields(TEXTURE).values():
        if GENERATE not in s.requests and s is not USE_ADVANCED:
            layout.prop(holder, s.name)


def draw_settings(layout: bpy.types.UILayout, holder: Any) -> None:
    """Every setting in its section, all at once (the preferences; the panel folds the sections)."""
    for title, draw in (("Generation", draw_main), ("Asset", draw_asset), ("Texturing", draw_texturing),
                        ("Advanced", draw_advanced)):
        col = layout.column()
        col.label(text=title)
        draw(col, holder)
