"""What a job is on the wire: the submit's settings map, how failures become `error` messages, and how a textured
mesh becomes a `result` (and back, for clients that write files).

Settings map of a `submit` (every key optional; the full schema is in backend/server/README.md):

    {"seed": 7, "pipeline_type": "1024_cascade", ...}     generation: the fields of GenerationSettings
    {"asset": {"faces": 200000, "texture_size": 1024}}    asset building: the fields of AssetSettings
    {"reprocess_job": "JOB_ID", "asset": {...}}           rebuild the asset of an earlier job from its stored
                                                          O-Voxel; no generation keys; the image is ignored
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from backend.asset.textured_mesh import AssetSettings, TexturedMesh
from backend.server.store import MissingOVoxel
from protocol import Error, ErrorCode, ProtocolError, Result
from protocol.messages import NAME_PATTERN

ASSET_KEY = "asset"
REPROCESS_KEY = "reprocess_job"
MAX_ERROR_TEXT = 2000  # exception texts can embed whole tensors; keep error messages readable
MESH_DTYPES = {"positions": np.float32, "indices": np.uint32, "normals": np.float32, "uvs": np.float32}
TEXTURE_NAMES = ("base_color", "metallic_roughness")
MATERIAL_KEYS = ("alpha_mode", "alpha_cutoff", "double_sided")


class InvalidSettings(ProtocolError):
    default_code = ErrorCode.INVALID_SETTINGS
    default_hint = "See the settings schema in backend/server/README.md."


@dataclass(frozen=True)
class JobSpec:
    """A validated settings map. `generation` is a GenerationSettings, None when re-processing."""

    generation: Any
    asset: AssetSettings
    reprocess_job: str | None = None


def parse_settings(raw: dict[str, Any]) -> JobSpec:
    """Validate an untrusted settings map; every problem is an InvalidSettings naming the key."""
    from backend.trellis2.pipeline import GenerationSettings  # torch: imported by the server before it serves

    rest = dict(raw)
    asset = _asset_settings(rest.pop(ASSET_KEY, {}))
    source = rest.pop(REPROCESS_KEY, None)
    if source is not None:
        if type(source) is not str or not NAME_PATTERN.fullmatch(source):
            raise InvalidSettings(f"{REPROCESS_KEY} must be a job id, got {source!r:.80}")
        if rest:
            raise InvalidSettings(f"with '{REPROCESS_KEY}' only '{ASSET_KEY}' settings are allowed, got {sorted(rest)}",
                                  hint="generation settings need a new job: leave out reprocess_job")
        return JobSpec(None, asset, source)
    try:
        return JobSpec(GenerationSettings.from_dict(rest), asset)
    except (TypeError, ValueError) as exc:
        raise InvalidSettings(f"bad generation settings: {exc}") from None


def _asset_settings(raw: Any) -> AssetSettings:
    if not isinstance(raw, dict):
        raise InvalidSettings(f"'{ASSET_KEY}' must be a map of asset settings, got {type(raw).__name__}")
    defaults = AssetSettings()
    valid = {f.name for f in fields(AssetSettings)}
    unknown = set(raw) - valid
    if unknown:
        raise InvalidSettings(f"unknown asset setting(s) {sorted(unknown)}; valid: {sorted(valid)}")
    clean = {}
    for key, value in raw.items():
        kind = type(getattr(defaults, key))
        if kind is float and type(value) is int:
            value = float(value)
        if type(value) is not kind:  # strict: a bool is not an int, a string is not a number
            raise InvalidSettings(f"asset.{key} must be {kind.__name__}, got {type(value).__name__}")
        clean[key] = value
    try:
        return AssetSettings(**clean)
    except ValueError as exc:
        raise InvalidSettings(f"bad asset settings: {exc}") from None


def failure_error(job_id: str, exc: BaseException) -> Error:
    """The `error` message for a job that raised `exc`; anything unforeseen is an internal error."""
    import torch  # loaded with the models; only failures after loading come here

    from backend.trellis2.pipeline import PipelineError
    from backend.trellis2.preprocess import ImageInputError

    if isinstance(exc, MissingOVoxel):
        return Error(ErrorCode.UNKNOWN_JOB, str(exc), "generate it again", job_id)
    if isinstance(exc, ImageInputError):
        return Error(ErrorCode.INVALID_IMAGE, _text(exc.problem), exc.fix, job_id)
    if isinstance(exc, PipelineError):
        code = ErrorCode.OUT_OF_MEMORY if exc.code == "out_of_memory" else ErrorCode.JOB_FAILED
        return Error(code, _text(exc.message), exc.hint, job_id)
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return Error(ErrorCode.OUT_OF_MEMORY, _text(f"out of memory: {exc}"),
                     "start the backend with --memory offload, or ask for fewer faces or a smaller texture_size",
                     job_id)
    return Error(ErrorCode.INTERNAL_ERROR, _text(f"{type(exc).__name__}: {exc}"),
                 "the server log has the traceback; please report it", job_id)


def _text(message: str) -> str:
    return message if len(message) <= MAX_ERROR_TEXT else message[:MAX_ERROR_TEXT] + " ..."


def result_message(job_id: str, mesh: TexturedMesh, metadata: dict[str, Any]) -> Result:
    """The wire form of a finished asset: conventional array names and dtypes, material facts in metadata."""
    arrays = {name: np.ascontiguousarray(getattr(mesh, name), dtype=dtype) for name, dtype in MESH_DTYPES.items()}
    textures = {name: np.ascontiguousarray(getattr(mesh, name), dtype=np.uint8) for name in TEXTURE_NAMES}
    facts = {key: getattr(mesh, key) for key in MATERIAL_KEYS}
    return Result(job_id, arrays, textures, plain({**metadata, **facts, "mesh": mesh.metadata}))


def textured_mesh_from_result(result: Result) -> TexturedMesh:
    """The TexturedMesh a Result carries (for GLB writing on the client side)."""
    meta = result.metadata
    return TexturedMesh(
        positions=result.mesh["positions"], indices=result.mesh["indices"].astype(np.int32),
        normals=result.mesh["normals"], uvs=result.mesh["uvs"], base_color=result.textures["base_color"],
        metallic_roughness=result.textures["metallic_roughness"],
        **{key: meta[key] for key in MATERIAL_KEYS if key in meta}, metadata=meta)


def plain(value: Any) -> Any:
    """A protocol value tree from metadata that may hold numpy scalars, tuples or non-finite floats."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def spec_metadata(spec: JobSpec) -> dict[str, Any]:
    """The settings a result was made with, for its metadata."""
    meta: dict[str, Any] = {"asset_settings": asdict(spec.asset)}
    if spec.reprocess_job is not None:
        meta["reprocessed_from"] = spec.reprocess_job
    else:
        meta["generation_settings"] = asdict(spec.generation)
    return meta
