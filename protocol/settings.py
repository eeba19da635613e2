"""Every job setting, written once: name, type, default, range or choices, label, help text, where it shows in the
add-on and which requests take it.

This table is the one source of truth for settings. The backend validates requests with it (`Schema.check` at
submit, `Schema.resolve` when a job runs), the CLIs build their flags from it (`--pipeline-type`, `--seed`, ...),
the add-on builds its properties and panel from it, and the server advertises it in `info` with its checkpoint's
own defaults (`Schema.with_defaults`, `Schema.to_wire`), so a newer server's settings reach an older add-on.
Settings are a flat map of these names everywhere: on the wire, in the CLIs, in the add-on and in stored jobs.

Validation is plain Python over this table rather than a library (pydantic, msgspec): the rules are types, ranges,
choices and one ordering, which fit in a screen of code, while those libraries are compiled wheels the extension
would have to bundle for every platform Blender runs on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import ErrorCode, ProtocolError

Value = bool | int | float | str
KINDS: dict[str, type] = {"bool": bool, "int": int, "float": float, "str": str}

# Request kinds: which message a setting travels in.
GENERATE, REPROCESS, TEXTURE = "generate", "reprocess", "texture"
REQUESTS = (GENERATE, REPROCESS, TEXTURE)
# Where a setting shows in the add-on.
SECTIONS = ("main", "asset", "advanced")

DEFAULT_WEIGHTS = "microsoft/TRELLIS.2-4B"  # the hub repo the backend loads when told nothing else
SEED_MAX = 2**31 - 1  # Blender's IntProperty is 32-bit; one range everywhere keeps seeds portable
TEXTURE_SIZES = (256, 512, 1024, 2048, 4096, 8192)


class InvalidSettings(ProtocolError):
    """A request's settings break the schema; the message names the setting."""

    default_code = ErrorCode.INVALID_SETTINGS
    default_hint = "See the settings table in backend/server/README.md, or `info` for this server's schema."


@dataclass(frozen=True)
class Choice:
    value: Value
    label: str
    help: str = ""


@dataclass(frozen=True)
class Setting:
    """One job setting. `stage` names the pipeline stage it tunes (the add-on groups sampler settings by it)."""

    name: str
    kind: str  # one of KINDS
    default: Value
    label: str
    help: str
    requests: tuple[str, ...]
    section: str = "main"
    stage: str = ""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Choice, ...] = ()

    @property
    def python_type(self) -> type:
        return KINDS[self.kind]

    def check(self, value: Any) -> Value:
        """`value` if it suits this setting (an int is accepted for a float), else InvalidSettings naming it."""
        kind = self.python_type
        if kind is float and type(value) is int:
            value = float(value)
        if type(value) is not kind:  # strict: a bool is not an int, "100" is not a number
            raise InvalidSettings(f"setting {self.name} must be {self.kind}, got {type(value).__name__} {value!r:.60}",
                                  hint=f"Pass {self.describe()} for {self.name}.")
        if kind is float and not math.isfinite(value):
            raise InvalidSettings(f"setting {self.name} must be finite, got {value}", hint=f"Pass {self.describe()}.")
        if self.choices and value not in [c.value for c in self.choices]:
            raise InvalidSettings(f"setting {self.name} is {value!r:.60}", hint=f"Use {self.describe()}.")
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
            raise InvalidSettings(f"setting {self.name} is {value}, outside its range", hint=f"Use {self.describe()}.")
        return value

    def describe(self) -> str:
        """The accepted values in words, for hints and help texts."""
        if self.choices:
            return "one of " + ", ".join(str(c.value) for c in self.choices)
        if self.minimum is not None and self.maximum is not None:
            if self.kind == "int":
                return f"an integer in [{int(self.minimum)}, {int(self.maximum)}]"
            return f"a number in [{self.minimum:g}, {self.maximum:g}]"
        return {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}[self.kind]

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "default": self.default, "label": self.label, "help": self.help,
                "requests": list(self.requests), "section": self.section, "stage": self.stage,
                "minimum": self.minimum, "maximum": self.maximum,
                "choices": [[c.value, c.label, c.help] for c in self.choices]}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> Setting:
        """A setting as a server advertised it; MalformedMessage-style errors become InvalidSettings."""
        try:
            setting = cls(
                name=str(raw["name"]), kind=str(raw["kind"]), default=raw["default"], label=str(raw["label"]),
                help=str(raw["help"]), requests=tuple(str(r) for r in raw["requests"]), section=str(raw["section"]),
                stage=str(raw["stage"]), minimum=_number(raw["minimum"]), maximum=_number(raw["maximum"]),
                choices=tuple(Choice(c[0], str(c[1]), str(c[2])) for c in raw["choices"]))
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise InvalidSettings(f"unreadable setting description {raw!r:.120}: {exc}") from None
        if setting.kind not in KINDS or setting.section not in SECTIONS:
            raise InvalidSettings(f"setting {setting.name} has unknown kind {setting.kind!r} or section "
                                  f"{setting.section!r}")
        setting.check(setting.default)
        return setting


def _number(value: Any) -> float | None:
    if value is None:
        return None
    if type(value) not in (int, float):
        raise ValueError(f"{value!r} is not a number")
    return value


@dataclass(frozen=True)
class Schema:
    """An ordered table of settings, plus the pairs whose first value may not exceed the second."""

    settings: tuple[Setting, ...]
    ordered_pairs: tuple[tuple[str, str], ...] = ()
    _by_name: dict[str, Setting] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {s.name: s for s in self.settings})
        if len(self._by_name) != len(self.settings):
            raise ValueError("setting names must be unique")

    def __getitem__(self, name: str) -> Setting:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def for_request(self, request: str) -> tuple[Setting, ...]:
        return tuple(s for s in self.settings if request in s.requests)

    def defaults(self, request: str) -> dict[str, Value]:
        return {s.name: s.default for s in self.for_request(request)}

    def check(self, request: str, raw: Mapping[str, Any]) -> dict[str, Value]:
        """The given settings of a `request`, validated and normalised (ints to floats where a float is due);
        unknown names, names of other requests and bad values raise InvalidSettings naming the setting."""
        if request not in REQUESTS:
            raise InvalidSettings(f"unknown request kind {request!r}")
        if not isinstance(raw, Mapping):
            raise InvalidSettings(f"settings must be a map of setting names to values, got {type(raw).__name__}")
        accepted = {s.name for s in self.for_request(request)}
        unknown = sorted(str(name) for name in raw if name not in accepted)
        if unknown:
            raise InvalidSettings(f"unknown setting(s) for {request}: {', '.join(unknown)[:300]}",
                                  hint=f"Valid settings for {request}: {', '.join(sorted(accepted))}.")
        checked = {name: self[name].check(value) for name, value in raw.items()}
        self._check_order(checked, self.defaults(request))
        return checked

    def resolve(self, request: str, raw: Mapping[str, Any]) -> dict[str, Value]:
        """Every setting of `request`: the given ones (validated) over this schema's defaults."""
        return {**self.defaults(request), **self.check(request, raw)}

    def with_defaults(self, defaults: Mapping[str, Value]) -> Schema:
        """This schema with other defaults (a checkpoint's own sampler values, say), each checked."""
        unknown = sorted(set(defaults) - set(self._by_name))
        if unknown:
            raise InvalidSettings(f"defaults for unknown setting(s) {unknown}")
        return replace(self, settings=tuple(replace(s, default=s.check(defaults[s.name])) if s.name in defaults
                                            else s for s in self.settings))

    def _check_order(self, checked: Mapping[str, Value], defaults: Mapping[str, Value]) -> None:
        for low, high in self.ordered_pairs:
            if low in checked or high in checked:
                lo, hi = checked.get(low, defaults.get(low)), checked.get(high, defaults.get(high))
                if lo is not None and hi is not None and lo > hi:
                    raise InvalidSettings(f"setting {low} ({lo}) is greater than {high} ({hi})",
                                          hint=f"Keep {low} <= {high}.")

    def to_wire(self) -> dict[str, Any]:
        return {"settings": [s.to_wire() for s in self.settings], "ordered_pairs": [list(p) for p in self.ordered_pairs]}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> Schema:
        """A schema a server advertised; settings of kinds or sections this version does not know are skipped."""
        if not isinstance(raw, Mapping) or not isinstance(raw.get("settings"), list):
            raise InvalidSettings("the server's settings schema is not a map with a 'settings' list")
        settings = []
        for item in raw["settings"]:
            if isinstance(item, Mapping) and item.get("kind") in KINDS and item.get("section") in SECTIONS:
                settings.append(Setting.from_wire(item))
        pairs = tuple((str(p[0]), str(p[1])) for p in raw.get("ordered_pairs", []) if isinstance(p, list) and len(p) == 2)
        return cls(tuple(settings), pairs)


# ---------------------------------------------------------------------------------------------------------------
# The table

ASSET_REQUESTS = (GENERATE, REPROCESS)
TEXTURE_AND_ASSET = (GENERATE, REPROCESS, TEXTURE)
# The official checkpoint's per-stage sampler params (pipeline.json of microsoft/TRELLIS.2-4B). A server replaces
# these defaults with its own checkpoint's values.
SAMPLER_STAGES = {
    "sparse_structure": ("Structure", (GENERATE,),
                         dict(steps=12, guidance_strength=7.5, guidance_rescale=0.7, guidance_interval_start=0.6,
                              guidance_interval_end=1.0, rescale_t=5.0)),
    "shape": ("Shape", (GENERATE,),
              dict(steps=12, guidance_strength=7.5, guidance_rescale=0.5, guidance_interval_start=0.6,
                   guidance_interval_end=1.0, rescale_t=3.0)),
    "texture": ("Texture", (GENERATE, TEXTURE),
                dict(steps=12, guidance_strength=1.0, guidance_rescale=0.0, guidance_interval_start=0.6,
                     guidance_interval_end=0.9, rescale_t=3.0)),
}
SAMPLER_PARAMS = ("steps", "guidance_strength", "guidance_rescale", "guidance_interval_start", "guidance_interval_end",
                  "rescale_t")


def sampler_setting_name(stage: str, param: str) -> str:
    return f"{stage}_{param}"


def _sampler_settings(stage: str, label: str, requests: tuple[str, ...], values: dict[str, Value]) -> list[Setting]:
    def one(param: str, kind: str, title: str, text: str, lo: float, hi: float) -> Setting:
        return Setting(sampler_setting_name(stage, param), kind, values[param], f"{label} {title}", text, requests,
                       "advanced", stage, lo, hi)

    return [
        one("steps", "int", "steps", f"Sampling steps of the {label.lower()} stage", 1, 100),
        one("guidance_strength", "float", "guidance", "Classifier-free guidance strength", 0.0, 20.0),
        one("guidance_rescale", "float", "guidance rescale",
            "Rescales guided predictions toward the unguided ones' spread (0: off)", 0.0, 1.0),
        one("guidance_interval_start", "float", "guidance from",
            "Guidance applies while the time t is at least this (t runs from 1 to 0)", 0.0, 1.0),
        one("guidance_interval_end", "float", "guidance until", "Guidance applies while t is at most this", 0.0, 1.0),
        one("rescale_t", "float", "time shift", "Shifts the sampling time grid toward the noisy end", 0.1, 20.0),
    ]


SETTINGS = Schema(
    settings=(
        Setting("pipeline_type", "str", "1024_cascade", "Pipeline",
                "Which shape stages run, and so the detail and memory cost", (GENERATE,), choices=(
                    Choice("512", "512", "Fastest: one 512 shape stage, coarse detail"),
                    Choice("1024", "1024", "One 1024 shape stage"),
                    Choice("1024_cascade", "1024 cascade", "512 shape, refined at 1024 (the reference default)"),
                    Choice("1536_cascade", "1536 cascade", "512 shape, refined at 1536: most detail, most memory"))),
        Setting("resolution", "int", 1024, "Resolution", "Voxel resolution at which an existing mesh is textured",
                (TEXTURE,), choices=(Choice(512, "512", "Fastest"), Choice(1024, "1024", "The reference default"),
                                     Choice(1536, "1536", "Most detail, most memory"))),
        Setting("seed", "int", 42, "Seed",
                "Seed of the random noise: the same image, seed and settings give the same result",
                (GENERATE, TEXTURE), minimum=0, maximum=SEED_MAX),
        Setting("remove_background", "bool", True, "Remove background",
                "Cut the subject out of the image first (off: the image's own alpha is used)", (GENERATE, TEXTURE)),
        Setting("faces", "int", 500_000, "Faces", "Target triangle count of the final mesh", ASSET_REQUESTS,
                "asset", "asset", 1_000, 20_000_000),
        Setting("texture_size", "int", 2048, "Texture size", "Width and height of the baked textures",
                TEXTURE_AND_ASSET, "asset", "asset", choices=tuple(Choice(s, str(s), f"{s} x {s} texels")
                                                                   for s in TEXTURE_SIZES)),
        Setting("remesh", "bool", False, "Remesh",
                "Rebuild a clean, closed surface before simplifying (slower, single-sided)", ASSET_REQUESTS,
                "asset", "asset"),
        Setting("alpha_mode", "str", "AUTO", "Alpha", "How the texture's alpha becomes transparency",
                TEXTURE_AND_ASSET, "asset", "asset", choices=(
                    Choice("AUTO", "Auto", "Opaque unless 0.5% of the surface is clearly transparent (alpha < 0.9); "
                                           "then Mask for cut-outs, Blend where much of it is partly transparent"),
                    Choice("OPAQUE", "Opaque", "Ignore the texture's alpha"),
                    Choice("MASK", "Mask", "Cut out texels below the alpha cutoff"),
                    Choice("BLEND", "Blend", "Smooth transparency from the texture's alpha"))),
        Setting("alpha_cutoff", "float", 0.5, "Alpha cutoff", "Texels with lower alpha are cut out (Mask)",
                TEXTURE_AND_ASSET, "asset", "asset", 0.0, 1.0),
        Setting("remesh_band", "float", 1.0, "Remesh band", "Half-width of the remesher's narrow band, in voxels",
                ASSET_REQUESTS, "advanced", "asset", 0.25, 4.0),
        Setting("sharp_angle", "float", 40.0, "Sharp edges",
                "Edges whose faces meet at a larger angle (degrees) are shaded sharp, the rest smooth",
                ASSET_REQUESTS, "advanced", "asset", 0.0, 180.0),
        Setting("fill_hole_perimeter", "float", 0.03, "Hole filling",
                "Holes with a shorter boundary are closed (object units; the object spans 1)", ASSET_REQUESTS,
                "advanced", "asset", 0.0, 1.0),
        *(s for stage, (label, requests, values) in SAMPLER_STAGES.items()
          for s in _sampler_settings(stage, label, requests, values)),
        Setting("max_num_tokens", "int", 49152, "Max tokens",
                "Upper bound on sparse tokens in cascades (lower: less GPU memory)", (GENERATE,), "advanced",
                "shape", 1024, 1_000_000),
    ),
    ordered_pairs=tuple((sampler_setting_name(stage, "guidance_interval_start"),
                         sampler_setting_name(stage, "guidance_interval_end")) for stage in SAMPLER_STAGES),
)


def sampler_values(settings: Mapping[str, Value], stage: str) -> dict[str, Value]:
    """The sampler params of `stage` out of resolved flat settings, keyed by param name."""
    return {param: settings[sampler_setting_name(stage, param)] for param in SAMPLER_PARAMS}

PIPELINE_TYPES = tuple(str(c.value) for c in SETTINGS["pipeline_type"].choices)
