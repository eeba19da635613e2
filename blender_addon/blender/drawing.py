"""Layout of the settings fields, shared by the sidebar panel and the preferences (the same fields, the same order)."""

from __future__ import annotations

from typing import Any

import bpy

from ..core.settings import ASSET_FIELDS, GENERATION_FIELDS, SAMPLER_STAGES


def draw_generation(layout: bpy.types.UILayout, holder: Any, seed_button: bool = False) -> None:
    for f in GENERATION_FIELDS:
        if f.name == "seed" and seed_button:
            row = layout.row(align=True)
            row.prop(holder, "seed")
            row.operator("trellis2.randomize_seed", text="", icon="FILE_REFRESH")
        else:
            layout.prop(holder, f.name)


def draw_asset(layout: bpy.types.UILayout, holder: Any) -> None:
    for f in ASSET_FIELDS:
        if f.name != "alpha_cutoff" or holder.alpha_mode == "MASK":
            layout.prop(holder, f.name)


def draw_advanced(layout: bpy.types.UILayout, holder: Any) -> None:
    layout.prop(holder, "custom_sampling")
    for stage, (label, _values) in SAMPLER_STAGES.items():
        col = layout.column(align=True, heading=label)
        col.enabled = holder.custom_sampling
        for key in ("steps", "guidance_strength", "guidance_rescale", "rescale_t"):
            col.prop(holder, f"{stage}_{key}")
    layout.prop(holder, "max_num_tokens")


def draw_settings(layout: bpy.types.UILayout, holder: Any) -> None:
    """Every settings field in its group, all at once (the preferences; the panel folds the groups)."""
    for title, draw in (("Generation", draw_generation), ("Asset", draw_asset), ("Advanced", draw_advanced)):
        col = layout.column()
        col.label(text=title)
        draw(col, holder)
