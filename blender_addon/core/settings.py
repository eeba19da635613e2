"""Generation settings: one table of fields that the preferences, the panel and the operator are all built from,
their validation, and their translation into the backend's settings map.

Settings travel as a flat dict keyed by field name (the operator's keyword arguments). Sampler fields are sent only
when `custom_sampling` is on, so by default the backend uses the checkpoint's own per-stage values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .errors import AddonError

Value = int | float | bool | str


@dataclass(frozen=True)
class Field:
    name: str
    label: str
    description: str
    default: Value
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[tuple[str, str, str], ...] = ()  # (value, label, description) for an enum

    def check(self, value: Any) -> Value:
        """The value if it suits this field, else an AddonError naming the field and the accepted values."""
        kind = type(self.default)
        if kind is float and type(value) is int:
            value = float(value)
        if type(value) is not kind:
            raise AddonError(f"Setting {self.name} must be {kind.__name__}, got {value!r}",
                             f"Pass a {kind.__name__} for {self.name}.")
        if self.choices and value not in [c[0] for c in self.choices]:
            raise AddonError(f"Setting {self.name} is {value!r}",
                             f"Use one of {', '.join(c[0] for c in self.choices)}.")
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
            raise AddonError(f"Setting {self.name} is {value}", f"Use a value in [{self.minimum:g}, {self.maximum:g}].")
        return value


PIPELINE_TYPES = (
    ("512", "512", "Fastest: one 512 shape stage, coarse detail"),
    ("1024", "1024", "One 1024 shape stage"),
    ("1024_cascade", "1024 cascade", "512 shape, refined at 1024 (the reference default)"),
    ("1536_cascade", "1536 cascade", "512 shape, refined at 1536: most detail, most memory"),
)
ALPHA_MODES = (
    ("AUTO", "Auto", "Blend when the texture has transparent texels, else opaque"),
    ("OPAQUE", "Opaque", "Ignore the texture's alpha"),
    ("MASK", "Mask", "Cut out texels below the alpha cutoff"),
    ("BLEND", "Blend", "Smooth transparency from the texture's alpha"),
)
TEXTURE_SIZES = tuple((str(s), str(s), f"{s} x {s} texels") for s in (256, 512, 1024, 2048, 4096))
# The checkpoint's own per-stage sampler values (pipeline.json of microsoft/TRELLIS.2-4B), as UI defaults.
SAMPLER_STAGES = {
    "sparse_structure": ("Structure", dict(steps=12, guidance_strength=7.5, guidance_rescale=0.7, rescale_t=5.0)),
    "shape": ("Shape", dict(steps=12, guidance_strength=7.5, guidance_rescale=0.5, rescale_t=3.0)),
    "texture": ("Texture", dict(steps=12, guidance_strength=1.0, guidance_rescale=0.0, rescale_t=3.0)),
}
SEED_MAX = 2**31 - 1  # Blender's IntProperty is 32-bit


def _sampler_fields(stage: str, label: str, values: dict[str, Value]) -> tuple[Field, ...]:
    return (
        Field(f"{stage}_steps", f"{label} steps", f"Sampling steps of the {label.lower()} stage",
              values["steps"], 1, 100),
        Field(f"{stage}_guidance_strength", f"{label} guidance", "Classifier-free guidance strength",
              values["guidance_strength"], 0.0, 20.0),
        Field(f"{stage}_guidance_rescale", f"{label} guidance rescale", "Rescales guided predictions toward the "
              "unguided ones' spread (0: off)", values["guidance_rescale"], 0.0, 1.0),
        Field(f"{stage}_rescale_t", f"{label} time shift", "Shifts the sampling time grid toward the noisy end",
              values["rescale_t"], 0.1, 20.0),
    )


GENERATION_FIELDS = (
    Field("pipeline_type", "Pipeline", "Which shape stages run, and so the detail and memory cost",
          "1024_cascade", choices=PIPELINE_TYPES),
    Field("seed", "Seed", "Seed of the random noise: the same image, seed and settings give the same object",
          42, 0, SEED_MAX),
    Field("remove_background", "Remove background", "Cut the subject out of the image before generating "
          "(off: the image's own alpha is used)", True),
)
ASSET_FIELDS = (
    Field("faces", "Faces", "Target triangle count of the final mesh", 500_000, 1_000, 20_000_000),
    Field("texture_size", "Texture size", "Width and height of the baked textures", "2048", choices=TEXTURE_SIZES),
    Field("remesh", "Remesh", "Rebuild a clean, closed surface before simplifying (slower, single-sided)", False),
    Field("alpha_mode", "Alpha", "How the texture's alpha becomes transparency", "AUTO", choices=ALPHA_MODES),
    Field("alpha_cutoff", "Alpha cutoff", "Texels with lower alpha are cut out (Mask)", 0.5, 0.0, 1.0),
)
ADVANCED_FIELDS = (
    Field("custom_sampling", "Custom sampling", "Override the checkpoint's sampler settings with the ones below",
          False),
    *(f for stage, (label, values) in SAMPLER_STAGES.items() for f in _sampler_fields(stage, label, values)),
    Field("max_num_tokens", "Max tokens", "Upper bound on sparse tokens in cascades (lower: less GPU memory)",
          49152, 1024, 1_000_000),
)
FIELDS = {f.name: f for f in (*GENERATION_FIELDS, *ASSET_FIELDS, *ADVANCED_FIELDS)}
ASSET_NAMES = tuple(f.name for f in ASSET_FIELDS)


def defaults() -> dict[str, Value]:
    return {name: f.default for name, f in FIELDS.items()}


def resolve(values: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> dict[str, Value]:
    """Complete, checked settings: `values` over `base` (default: the built-in defaults)."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise AddonError(f"Unknown setting(s) {', '.join(unknown)}", f"Valid settings: {', '.join(FIELDS)}.")
    merged = {**(base if base is not None else defaults()), **values}
    return {name: f.check(merged[name]) for name, f in FIELDS.items()}


def asset_wire(settings: Mapping[str, Value]) -> dict[str, Any]:
    """The asset part of the backend's settings (also what a re-process changes)."""
    return {
        "faces": settings["faces"],
        "texture_size": int(settings["texture_size"]),
        "remesh": settings["remesh"],
        "alpha_mode": settings["alpha_mode"],
        "alpha_cutoff": settings["alpha_cutoff"],
    }


def reprocess_wire(job_id: str, settings: Mapping[str, Value]) -> dict[str, Any]:
    """Rebuild the asset of finished job `job_id` with other asset settings (no new generation)."""
    return {"reprocess_job": job_id, "asset": asset_wire(settings)}


def to_wire(settings: Mapping[str, Value]) -> dict[str, Any]:
    """The settings map the backend validates (its GenerationSettings plus an `asset` map)."""
    wire: dict[str, Any] = {
        "pipeline_type": settings["pipeline_type"],
        "seed": settings["seed"],
        "preprocess": settings["remove_background"],
        "max_num_tokens": settings["max_num_tokens"],
        "asset": asset_wire(settings),
    }
    if settings["custom_sampling"]:
        for stage in SAMPLER_STAGES:
            wire[f"{stage}_sampler"] = {
                key: settings[f"{stage}_{key}"] for key in ("steps", "guidance_strength", "guidance_rescale",
                                                             "rescale_t")
            }
    return wire
