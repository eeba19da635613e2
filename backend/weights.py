"""Which files the chosen pipelines need, which are cached, and getting the rest: `python -m backend weights`.

The weights are a hub repo (microsoft/TRELLIS.2-4B) or a local folder in its layout. Its `pipeline.json` names the
checkpoint stems, some in another repo (the sparse-structure decoder lives in microsoft/TRELLIS-image-large), and
the DINOv3 repo, which is gated: access to it is checked **first**, before any large download, because a user
without it learns nothing useful from the other 14 GB. Downloads go through huggingface_hub (resumable, into its
cache) with a progress callback, which the CLI draws as a bar and the server reports as loading progress. The
background-removal model comes from rembg's own download and is needed only for images without alpha.

Torch-free, so `check` answers in about a second and a missing file fails fast.
"""

from __future__ import annotations

import json
from functools import partial
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.errors import ModelUnavailable
from backend.progress import report_loading
from protocol.settings import DEFAULT_WEIGHTS
from backend.trellis2.pipeline_types import ALWAYS_LOADED, PIPELINE_TYPES, TEXTURING_MODELS

DINOV3_FILES = ("config.json", "model.safetensors")
# Called as bytes arrive: (file being fetched, bytes of it done, its total bytes or 0 when unknown).
DownloadProgress = Callable[[str, int, int], None]
NETWORK_TIMEOUT_S = 5.0  # a missing or unreachable hub is reported within seconds, not after retries


@dataclass(frozen=True)
class WeightFile:
    """One file a pipeline needs: in a hub repo (`repo` set) or in the local weights folder (`repo` None)."""

    repo: str | None
    path: str  # inside the repo, or relative to the local folder
    role: str  # for people: "shape_slat_flow_model_512", "DINOv3", ...
    gated: bool = False

    @property
    def name(self) -> str:
        return f"{self.repo}/{self.path}" if self.repo else self.path


@dataclass
class FileStatus:
    file: WeightFile
    local: Path | None  # where it is, if it is here
    size: int | None  # bytes: on disk when here, else the hub's figure when it could be asked


def _is_repo_id(weights: str) -> bool:
    return not Path(weights).exists() and weights.count("/") == 1 and not weights.startswith(("/", ".", "~"))


def _stem_files(weights: str, stem: str, role: str) -> list[WeightFile]:
    """The .json + .safetensors of a checkpoint stem, where the pipeline's loader will look for them: under the
    weights (folder or repo), or in another repo when the stem starts with one (owner/repo/path)."""
    parts = stem.split("/")
    if not _is_repo_id(weights) and (Path(weights) / f"{stem}.json").is_file():
        return [WeightFile(None, f"{stem}{ext}", role) for ext in (".json", ".safetensors")]
    if len(parts) >= 3 and parts[0] != "ckpts":
        repo, path = "/".join(parts[:2]), "/".join(parts[2:])
    elif _is_repo_id(weights):
        repo, path = weights, stem
    else:
        return [WeightFile(None, f"{stem}{ext}", role) for ext in (".json", ".safetensors")]
    return [WeightFile(repo, f"{path}{ext}", role) for ext in (".json", ".safetensors")]


def models_for(pipelines: Iterable[str]) -> list[str]:
    """The pipeline.json model keys the given pipeline types (and "texturing") load, in loading order."""
    names = list(ALWAYS_LOADED)
    for name in pipelines:
        models = TEXTURING_MODELS if name == "texturing" else PIPELINE_TYPES[name].models
        names += [m for m in models if m not in names]
    return names


def needed_files(weights: str, config: dict[str, Any], pipelines: Iterable[str],
                 texturing_config: dict[str, Any] | None = None) -> list[WeightFile]:
    """Every file the pipelines need, the gated DINOv3 files first. `config` is pipeline.json; for "texturing",
    `texturing_config` is texturing_pipeline.json (its models come from its own map)."""
    args = config["args"]
    wanted = list(pipelines)
    files: list[WeightFile] = []
    cond = args["image_cond_model"]["args"]["model_name"]
    if not (Path(weights) / cond).is_dir():
        files += [WeightFile(cond, f, "DINOv3 (image conditioning)", gated=True) for f in DINOV3_FILES]
    stems = dict(args["models"])
    if "texturing" in wanted and texturing_config is not None:
        stems.update({k: v for k, v in texturing_config["args"]["models"].items() if k not in stems})
    for name in models_for(wanted):
        if name in stems:
            files += _stem_files(weights, stems[name], name)
    return files


def read_config(weights: str, filename: str = "pipeline.json") -> dict[str, Any]:
    """pipeline.json (or texturing_pipeline.json) of a folder or hub repo; ModelUnavailable says why not."""
    local = Path(weights) / filename
    try:
        if local.is_file():
            return json.loads(local.read_text())
        if not _is_repo_id(weights):
            raise ModelUnavailable(f"{weights} holds no {filename}",
                                   "give the folder of a TRELLIS.2 checkpoint (pipeline.json + ckpts/) or a Hugging "
                                   "Face repo id such as microsoft/TRELLIS.2-4B")
        config_file = WeightFile(weights, filename, filename)
        cached = _cached(weights, config_file)
        return json.loads((cached or Path(_download(config_file))).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelUnavailable(f"cannot read {filename} of {weights}: {exc}", _hub_hint()) from exc


def status(weights: str, files: list[WeightFile], ask_hub: bool = True) -> list[FileStatus]:
    """Where each file is, and its size (on disk; from the hub when `ask_hub` and it is reachable)."""
    out = []
    for f in files:
        local = _cached(weights, f)
        out.append(FileStatus(f, local, local.stat().st_size if local is not None else None))
    if ask_hub:
        _fill_remote_sizes([s for s in out if s.local is None])
    return out


def check_access(repo: str) -> None:
    """Raise ModelUnavailable, saying exactly what to do, unless this machine may download the gated `repo`."""
    from huggingface_hub import auth_check
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        auth_check(repo)
    except GatedRepoError as exc:
        raise ModelUnavailable(
            f"{repo} is gated and this machine's Hugging Face account has not been granted access",
            f"open https://huggingface.co/{repo}, accept the licence with your account, then run `hf auth login` "
            f"here (or set HF_TOKEN) and try again") from exc
    except RepositoryNotFoundError as exc:
        raise ModelUnavailable(f"{repo} cannot be seen by this machine's Hugging Face account",
                               "log in with `hf auth login` (or set HF_TOKEN) with an account that has accepted "
                               f"its licence at https://huggingface.co/{repo}") from exc
    except Exception as exc:  # no network, DNS, proxy: say so, with the offline way out
        raise ModelUnavailable(f"the Hugging Face hub cannot be reached ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else 'no answer'})", _hub_hint()) from exc


def hub_reachable(timeout: float = NETWORK_TIMEOUT_S) -> bool:
    """Whether the hub answers a TCP connection within `timeout` (False with HF_HUB_OFFLINE=1). Asked before any
    download, because huggingface_hub retries an unreachable hub with back-off for about half a minute per file."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def go_offline() -> None:
    """Use only cached files from now on in this process (huggingface_hub and transformers), so that a machine
    without a connection loads its cached weights at once instead of retrying every file."""
    import os

    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def online_or_offline() -> bool:
    """Whether the hub can be reached; when not, the process goes offline (cached files only) at once."""
    online = hub_reachable()
    if not online:
        go_offline()
    return online


def plan(weights: str, pipelines: Iterable[str], ask_hub: bool, texturing_optional: bool) -> list[FileStatus]:
    """The status of every file the pipelines need. Weights without texturing_pipeline.json provide the image
    pipeline alone when `texturing_optional` (texturing was not asked for by name), else that is an error."""
    pipelines = list(pipelines)
    config = read_config(weights)
    texturing = None
    if "texturing" in pipelines:
        try:
            texturing = read_config(weights, "texturing_pipeline.json")
        except ModelUnavailable:
            if not texturing_optional:
                raise
            pipelines.remove("texturing")
    return status(weights, needed_files(weights, config, pipelines, texturing), ask_hub=ask_hub)


def ensure_available(weights: str, pipelines: Iterable[str], progress: DownloadProgress | None = None) -> None:
    """Every file the pipelines need is here afterwards, or ModelUnavailable says, within seconds, what is missing
    and how to get it. Without a reachable hub the process goes offline (cached files only)."""
    online = online_or_offline()
    statuses = plan(weights, pipelines, ask_hub=False, texturing_optional=True)
    missing = [s for s in statuses if s.local is None]
    if missing and not online:
        names = ", ".join(s.file.name for s in missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise ModelUnavailable(f"{len(missing)} of the {len(statuses)} weight files are not here and the Hugging Face "
                               f"hub cannot be reached ({names})", _hub_hint())
    download(weights, statuses, progress or partial(report_loading, "downloading"))


def download(weights: str, statuses: list[FileStatus], progress: DownloadProgress | None = None) -> list[Path]:
    """Fetch every missing file (gated repos' access checked first); returns the local paths of all files."""
    missing = [s for s in statuses if s.local is None]
    for repo in dict.fromkeys(s.file.repo for s in missing if s.file.gated):
        check_access(repo)
    paths = []
    for s in statuses:
        if s.local is not None:
            paths.append(s.local)
        elif s.file.repo is None:
            raise ModelUnavailable(f"{Path(weights) / s.file.path} is missing from the weights folder",
                                   "copy the complete checkpoint there, or pass the hub repo id as --weights")
        else:
            paths.append(Path(_download(s.file, progress)))
    return paths


def _cached(weights: str, f: WeightFile) -> Path | None:
    if f.repo is None:
        path = Path(weights) / f.path
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(f.repo, f.path)
    return Path(found) if isinstance(found, str) else None


def _fill_remote_sizes(missing: list[FileStatus]) -> None:
    from huggingface_hub import HfApi

    by_repo: dict[str, list[FileStatus]] = {}
    for s in missing:
        by_repo.setdefault(s.file.repo, []).append(s)
    for repo, items in by_repo.items():
        if repo is None:
            continue
        try:
            infos = {i.path: i for i in HfApi().get_paths_info(repo, [s.file.path for s in items])}
        except Exception:  # unreachable or gated: sizes stay unknown; `download` says why
            continue
        for s in items:
            s.size = getattr(infos.get(s.file.path), "size", None)


def _download(f: WeightFile, progress: DownloadProgress | None = None) -> str:
    from huggingface_hub import constants, hf_hub_download

    if constants.HF_HUB_OFFLINE:
        raise ModelUnavailable(f"{f.name} is not cached here and the Hugging Face hub cannot be reached (or "
                               "HF_HUB_OFFLINE=1 is set)", _hub_hint())

    import inspect

    reports = progress is not None and "tqdm_class" in inspect.signature(hf_hub_download).parameters  # hub >= 0.32
    kwargs = {"tqdm_class": _progress_bar_class(f.name, progress)} if reports else {}
    try:
        return hf_hub_download(repo_id=f.repo, filename=f.path, etag_timeout=NETWORK_TIMEOUT_S, **kwargs)
    except Exception as exc:
        raise ModelUnavailable(f"cannot download {f.name} ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else 'no answer'})", _hub_hint()) from exc


def _progress_bar_class(name: str, progress: DownloadProgress) -> type:
    """A tqdm class that reports to `progress` instead of drawing (huggingface_hub drives it)."""
    from tqdm.auto import tqdm

    class Reporting(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self.done = 0

        def update(self, n: float | None = 1) -> bool | None:
            self.done += int(n or 0)
            progress(name, self.done, int(self.total or 0))
            return None

    return Reporting


def _hub_hint() -> str:
    from huggingface_hub import constants

    return (f"run `python -m backend weights download` where there is a connection (DINOv3 is gated: accept its "
            f"licence on its hub page and `hf auth login` first); files are cached in {constants.HF_HUB_CACHE} "
            f"(HF_HOME moves it); copy that cache, or a folder in the hub layout given as --weights, to an offline "
            f"machine and set HF_HUB_OFFLINE=1")


# ----------------------------------------------------------------------------------------------------------------
# command line

PIPELINE_CHOICES = (*PIPELINE_TYPES, "texturing")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("weights", help="list, check and download the weights the pipelines need",
                              description="Every file the chosen pipelines need, what is cached (with sizes), and "
                                          "downloading the rest (resumable; the gated DINOv3 access is checked first).")
    p.add_argument("action", choices=("check", "download"), nargs="?", default="check")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="hub repo id or local folder (default: %(default)s)")
    p.add_argument("--pipelines", nargs="+", choices=PIPELINE_CHOICES,
                   help="which pipelines to provide for (default: all the weights have)")
    p.add_argument("--offline", action="store_true", help="only look at the cache (no hub queries for sizes)")
    p.set_defaults(run=weights_command)


def weights_command(args: Any) -> int:
    import sys

    try:
        if args.offline:
            go_offline()
        online = not args.offline and online_or_offline()
        statuses = plan(args.weights, args.pipelines or PIPELINE_CHOICES, ask_hub=online,
                        texturing_optional=args.pipelines is None)
        _print_table(statuses)
        missing = [s for s in statuses if s.local is None]
        if args.action == "check":
            if missing:
                size = sum(s.size or 0 for s in missing)
                print(f"{len(missing)} of {len(statuses)} files missing ({_size(size) if size else 'size unknown'});"
                      f" get them with: python -m backend weights download --weights {args.weights}", file=sys.stderr)
                return 1
            print(f"all {len(statuses)} files are here", file=sys.stderr)
            return 0
        if missing and not online:
            raise ModelUnavailable("the Hugging Face hub cannot be reached from here", _hub_hint())
        download(args.weights, statuses, _ProgressBar(sys.stderr))
        print(f"\nall {len(statuses)} files are here", file=sys.stderr)
        return 0
    except ModelUnavailable as exc:
        print(f"error: {exc.message}\nhint: {exc.hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopped; run the same command again to resume", file=sys.stderr)
        return 130


def _print_table(statuses: list[FileStatus]) -> None:
    for s in statuses:
        where = str(s.local) if s.local is not None else "missing"
        print(f"{s.file.role:<32} {_size(s.size) if s.size else '?':>9}  {s.file.name}  [{where}]")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


class _ProgressBar:
    """One redrawn line per file being downloaded: name, bytes, percentage."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.tty = stream, stream.isatty()

    def __call__(self, name: str, done: int, total: int) -> None:
        pct = f"{100 * done / total:5.1f}%" if total else ""
        line = f"{name}: {_size(done)}{' of ' + _size(total) if total else ''} {pct}"
        if self.tty:
            self.stream.write(f"\r{line:<100}")
        elif total and done >= total:
            self.stream.write(line + "\n")
        self.stream.flush()
