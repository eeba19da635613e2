"""A tiny Cycles render of a built object, looked at: the texture shows (red top, blue bottom) and the alpha hole
in the middle lets the transparent background through."""

from __future__ import annotations

import math
from pathlib import Path

import bpy
import numpy as np

from test_build import build

SIZE = 64
ORTHO = 1.2  # world units across the image: the unit plane fills most of it


def render(path: Path) -> np.ndarray:
    """Render the scene from -Y with an orthographic camera; RGBA floats, top row first."""
    scene = bpy.context.scene
    camera = bpy.data.objects.new("camera", bpy.data.cameras.new("camera"))
    camera.data.type, camera.data.ortho_scale = "ORTHO", ORTHO
    camera.location, camera.rotation_euler = (0, -2, 0), (math.pi / 2, 0, 0)
    scene.collection.objects.link(camera)
    scene.camera = camera
    scene.world = bpy.data.worlds.new("world")
    if scene.world.node_tree is None:  # Blender < 5.0 creates worlds without nodes
        scene.world.use_nodes = True
    scene.world.node_tree.nodes["Background"].inputs["Color"].default_value = (1, 1, 1, 1)
    scene.render.engine = "CYCLES"
    scene.cycles.device, scene.cycles.samples, scene.cycles.use_denoising = "CPU", 16, False
    scene.render.resolution_x = scene.render.resolution_y = SIZE
    scene.render.resolution_percentage = 100
    scene.render.film_transparent = True
    scene.render.image_settings.color_mode = "RGBA"
    scene.view_settings.view_transform = "Standard"
    scene.render.filepath = str(path)
    assert bpy.ops.render.render(write_still=True) == {"FINISHED"}
    image = bpy.data.images.load(str(path))
    pixels = np.empty(SIZE * SIZE * 4, np.float32)
    image.pixels.foreach_get(pixels)
    return pixels.reshape(SIZE, SIZE, 4)[::-1]


def row_of(z: float) -> int:
    return int((ORTHO / 2 - z) / ORTHO * SIZE)


def test_a_tiny_cycles_render_shows_the_texture_and_the_alpha_hole(scene, tmp_path: Path) -> None:
    build("BLEND", location=(0, 0, 0))
    pixels = render(tmp_path / "render.png")
    opaque = pixels[..., 3] > 0.99
    assert 0.3 < opaque.mean() < 0.8  # not empty, not all object: the plane with its hole, and the background
    assert pixels[opaque][:, :3].std(axis=0).max() > 0.1  # not uniform
    top, bottom, centre = pixels[row_of(0.35), SIZE // 2], pixels[row_of(-0.35), SIZE // 2], pixels[SIZE // 2, SIZE // 2]
    assert top[3] > 0.99 and top[0] > 2 * top[2], f"top should be red, got {top}"
    assert bottom[3] > 0.99 and bottom[2] > 2 * bottom[0], f"bottom should be blue, got {bottom}"
    assert centre[3] < 0.05, f"the alpha hole should be transparent, got {centre}"
