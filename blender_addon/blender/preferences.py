"""Add-on preferences: where the backend runs (a local process the add-on starts itself, or a remote server with
CURVE keys) and the default settings; `backend_plan` hands where the backend is to the bpy-free session."""

from pathlib import Path

import bpy
from bpy.props import EnumProperty, PointerProperty, StringProperty

from ..core.connection import Connection
from ..core.errors import AddonError
from ..core.session import LOCAL, REMOTE, BackendPlan
from ..protocol.settings import DEFAULT_WEIGHTS
from .drawing import draw_settings
from .properties import SettingsGroup

PACKAGE = __package__.rpartition(".")[0]  # the extension's module name, e.g. bl_ext.user_default.trellis2
LOOPBACK_PREFIXES = ("tcp://127.", "tcp://localhost", "ipc://")


class Trellis2Preferences(bpy.types.AddonPreferences):
    bl_idname = PACKAGE

    backend_mode: EnumProperty(  # type: ignore[valid-type]
        name="Backend",
        items=[(LOCAL, "Local", "Start a backend on this computer when needed, stop it when Blender quits"),
               (REMOTE, "Remote Server", "Use a running backend, e.g. on a GPU server")],
        default=LOCAL)
    backend_python: StringProperty(  # type: ignore[valid-type]
        name="Backend Python", subtype="FILE_PATH",
        description="The python executable of the backend's environment (in a checkout: .venv/bin/python)")
    weights: StringProperty(  # type: ignore[valid-type]
        name="Weights", default=DEFAULT_WEIGHTS,
        description="Hugging Face repo id or local folder of the TRELLIS.2 weights, for the local backend")
    server_address: StringProperty(  # type: ignore[valid-type]
        name="Address", default="tcp://127.0.0.1:5555", description="ZeroMQ address of the remote backend")
    server_key: StringProperty(  # type: ignore[valid-type]
        name="Server Key", description="The server's public CURVE key: its server.key file from `python -m backend "
                                       "keys`, or the 40-character key itself; empty only for a backend on this machine")
    client_key_file: StringProperty(  # type: ignore[valid-type]
        name="Client Key File", subtype="FILE_PATH",
        description="Your keypair, client-secrets/NAME.key_secret from `python -m backend keys` on the server")
    defaults: PointerProperty(type=SettingsGroup)  # type: ignore[valid-type]

    def remote_connection(self) -> Connection:
        return Connection(self.server_address.strip(), self.server_key.strip(),
                          bpy.path.abspath(self.client_key_file.strip()))

    def local_backend_home(self) -> Path:
        """The local backend's folder (log and job store), in the extension's user folder: kept across updates."""
        return Path(bpy.utils.extension_path_user(PACKAGE, path="backend", create=True))

    def backend_plan(self, connecting: bool = False) -> BackendPlan:
        """Where the backend is, read here on the main thread. `connecting`: about to start or reach it, so a remote
        server beyond this machine needs Blender's online access (an AddonError says where to allow it) and the local
        backend's folder is made; the status line's plan skips both."""
        if self.backend_mode == REMOTE:
            remote = self.remote_connection()
            if connecting and not (bpy.app.online_access or remote.address.startswith(LOOPBACK_PREFIXES)):
                raise AddonError("Online access is disabled, so the add-on may not reach a remote server",
                                 "Enable Preferences > System > Network > Allow Online Access.")
            return BackendPlan(REMOTE, remote=remote)
        return BackendPlan(LOCAL, python=bpy.path.abspath(self.backend_python), weights=bpy.path.abspath(self.weights),
                           home=self.local_backend_home() if connecting else None)

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        layout.use_property_split = True
        layout.prop(self, "backend_mode", expand=True)
        if self.backend_mode == LOCAL:
            layout.prop(self, "backend_python")
            layout.prop(self, "weights")
        else:
            layout.prop(self, "server_address")
            layout.prop(self, "server_key")
            layout.prop(self, "client_key_file")
        layout.separator()
        layout.label(text="Default settings")
        draw_settings(layout, self.defaults)


def preferences(context: bpy.types.Context | None = None) -> Trellis2Preferences:
    return (context or bpy.context).preferences.addons[PACKAGE].preferences
