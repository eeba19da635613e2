"""Background removal through rembg's ONNX sessions, defaulting to the MIT-licensed BiRefNet.

The reference pipeline runs BiRefNet / RMBG-2.0 through transformers' remote code (spec §2.7); RMBG-2.0, the
checkpoint's default, is non-commercial. rembg's "birefnet-general" session is the MIT-licensed BiRefNet
(general, epoch 244) exported to ONNX, needs no remote code and runs on CPU or, with onnxruntime-gpu, on CUDA.
Its matte differs slightly from the reference's: rembg resizes with LANCZOS rather than bilinear, divides the
input by its brightest value rather than 255, and stretches the sigmoid output to the full 0..255 range.

rembg downloads named models on first use into `<U2NET_HOME or REMBG_HOME>/models/<name>/`. Offline, that
becomes a `BackgroundModelError` saying where to put the file; any ONNX file can also be given by path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image
from rembg.sessions import sessions as REMBG_SESSIONS
from rembg.sessions.base import BaseSession

from backend.errors import ModelUnavailable

DEFAULT_SESSION = "birefnet-general"


class BackgroundModelError(ModelUnavailable):
    """The background-removal model cannot be loaded; the message says which file is missing and where."""

    def __init__(self, message: str, hint: str = "images with their own alpha need no background removal; "
                                                   "or pass --rembg NAME_OR_ONNX") -> None:
        super().__init__(message, hint)


class RembgRemover:
    """Callable RGB image -> RGBA image whose alpha is the predicted 8-bit matte (the preprocessing's Remover).

    `session` picks rembg's pre- and post-processing for the model (e.g. "birefnet-general", "u2net");
    `model_path`, if given, is the ONNX file to run with it instead of rembg's download.
    `providers` are onnxruntime execution providers; by default rembg picks CUDA when it is available.
    """

    def __init__(self, session: str = DEFAULT_SESSION, model_path: str | Path | None = None,
                 providers: list[str] | None = None):
        session_class = _local_session_class(session)
        kwargs: dict = {} if providers is None else {"providers": providers}
        if model_path is not None:
            model_path = Path(model_path).expanduser().resolve()
            if not model_path.is_file():
                raise BackgroundModelError(f"background-removal model file not found: {model_path}")
            session_class = _with_model_file(session_class, model_path)
            kwargs["model_path"] = str(model_path)  # rembg's *_custom sessions insist on the argument
            source, has_file = str(model_path), True
        elif session.endswith("_custom"):
            raise BackgroundModelError(f"rembg session {session!r} runs a model of your own: pass model_path")
        else:
            existing = session_class.resolve_existing(f"{session}.onnx")
            source = existing or str(Path(session_class.model_dir()) / f"{session}.onnx")
            has_file = existing is not None
        try:
            self.session: BaseSession = session_class(session, ort.SessionOptions(), **kwargs)
        except Exception as exc:  # downloads raise requests/pooch errors, onnxruntime its own types
            if has_file:
                raise BackgroundModelError(
                    f"could not load the background-removal model {source} ({type(exc).__name__}: {exc}); "
                    f"delete the file and let rembg download it again, or replace it with a valid ONNX model"
                ) from exc
            raise BackgroundModelError(
                f"could not download the background-removal model {session!r} ({type(exc).__name__}: {exc}). "
                f"Without network access, copy the file {session}.onnx from a machine where rembg downloaded "
                f"it to {source} (the folder follows the environment variable U2NET_HOME, or REMBG_HOME when "
                f"U2NET_HOME is unset), or pass its location as model_path"
            ) from exc
        self.name = session

    def __call__(self, image: Image.Image) -> Image.Image:
        rgb = image.convert("RGB")
        matte = self.session.predict(rgb)[0]
        if matte.size != rgb.size:
            raise BackgroundModelError(f"{self.name} returned a matte of size {matte.size} for an image "
                                       f"of size {rgb.size}")
        rgba = rgb.convert("RGBA")
        rgba.putalpha(matte.convert("L"))
        return rgba


def _local_session_class(name: str) -> type[BaseSession]:
    """rembg's session class for `name`, refusing those that send the image to a web service."""
    local = sorted(n for n, cls in REMBG_SESSIONS.items() if cls.is_local())
    if name not in local:
        raise BackgroundModelError(f"unknown background-removal session {name!r}; choose one of {', '.join(local)}")
    return REMBG_SESSIONS[name]


def _with_model_file(session_class: type[BaseSession], path: Path) -> type[BaseSession]:
    """`session_class` reading its model from `path`: rembg would otherwise download it, or (for its custom
    sessions) accept only files inside its own model folder."""

    class FromFile(session_class):
        @classmethod
        def download_models(cls, *args, **kwargs) -> str:
            return str(path)

    return FromFile


def write_tiny_background_model(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random segmentation network as ONNX (1x3xHxW float in, 1x1xHxW out) for tests.

    Two 3x3 convolutions: it loads and runs in milliseconds through any rembg session, e.g.
    `RembgRemover(model_path=path)`. Needs the `onnx` package, which running models does not.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = {
        "conv1.weight": rng.normal(0, 0.5, (4, 3, 3, 3)),
        "conv1.bias": rng.normal(0, 0.1, (4,)),
        "conv2.weight": rng.normal(0, 0.5, (1, 4, 3, 3)),
        "conv2.bias": rng.normal(0, 0.1, (1,)),
    }
    initializers = [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()]
    same = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["hidden"], **same),
        helper.make_node("Relu", ["hidden"], ["hidden_relu"]),
        helper.make_node("Conv", ["hidden_relu", "conv2.weight", "conv2.bias"], ["logits"], **same),
    ]
    graph = helper.make_graph(
        nodes, "tiny_segmentation",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, "height", "width"])],
        initializer=initializers,
    )
    # IR 8 / opset 17: readable by every onnxruntime from 1.14 on, so users' older GPU builds load it too.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="trellis2-blender")
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


class LazyRemover:
    """A RembgRemover made on first use: images that carry their own alpha never need the model, so a missing
    download must not stop the pipeline from loading; it fails (clearly) only the job that needs it."""

    def __init__(self, spec: str | None = None):
        self.spec = spec or DEFAULT_SESSION
        self._remover: RembgRemover | None = None

    @classmethod
    def for_pipeline(cls, weights: str, args: dict) -> LazyRemover:
        """The remover for a pipeline JSON: a local ONNX file its `rembg_model.args.model_path` names under the
        weights folder, else the default (the MIT BiRefNet; the hub's RMBG-2.0 is gated and non-commercial)."""
        rembg_args = args.get("rembg_model", {}).get("args", {})
        return cls(str(Path(weights) / rembg_args["model_path"]) if "model_path" in rembg_args else None)

    def __call__(self, image: Image.Image) -> Image.Image:
        if self._remover is None:
            path = Path(self.spec).expanduser()
            is_file = path.suffix == ".onnx" or path.is_file()
            self._remover = RembgRemover(model_path=path) if is_file else RembgRemover(session=self.spec)
        return self._remover(image)
