"""GLB export: our reader round trip, and the file's conventions as an independent reader (trimesh) and the raw
glTF JSON see them: Y-up axes, v-down UVs with texture rows top first, alpha mode/cutoff, double-sidedness."""

from __future__ import annotations

import io

import numpy as np
import pygltflib as gl
import pytest
import trimesh
from PIL import Image

from backend.asset.glb import glb_bytes, read_glb, write_glb
from backend.asset.textured_mesh import TexturedMesh


def make_mesh(alpha_mode: str = "OPAQUE", double_sided: bool = False, cutoff: float = 0.5) -> TexturedMesh:
    rng = np.random.default_rng(0)
    sphere = trimesh.creation.icosphere(2, radius=0.4)
    v = np.asarray(sphere.vertices, dtype=np.float32)
    base = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    base[0, :, :3] = (255, 0, 0)  # top row red
    base[-1, :, :3] = (0, 0, 255)  # bottom row blue
    return TexturedMesh(
        positions=v, indices=np.asarray(sphere.faces, dtype=np.int32),
        normals=v / np.linalg.norm(v, axis=1, keepdims=True),
        uvs=rng.uniform(0, 1, (len(v), 2)).astype(np.float32),
        base_color=base, metallic_roughness=rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        alpha_mode=alpha_mode, alpha_cutoff=cutoff, double_sided=double_sided,
    )


@pytest.mark.parametrize("alpha_mode,double_sided", [("OPAQUE", False), ("MASK", True), ("BLEND", False)])
def test_round_trip(tmp_path, alpha_mode: str, double_sided: bool) -> None:
    mesh = make_mesh(alpha_mode, double_sided, cutoff=0.3)
    write_glb(mesh, tmp_path / "m.glb")
    back = read_glb(tmp_path / "m.glb")
    np.testing.assert_array_equal(back.positions, mesh.positions)
    np.testing.assert_array_equal(back.indices, mesh.indices)
    np.testing.assert_array_equal(back.normals, mesh.normals)
    np.testing.assert_allclose(back.uvs, mesh.uvs, atol=1e-7)
    np.testing.assert_array_equal(back.base_color, mesh.base_color)
    np.testing.assert_array_equal(back.metallic_roughness, mesh.metallic_roughness)
    assert back.alpha_mode == alpha_mode and back.double_sided == double_sided
    assert back.alpha_cutoff == pytest.approx(0.3 if alpha_mode == "MASK" else 0.5)


def test_file_conventions_seen_by_trimesh(tmp_path) -> None:
    mesh = make_mesh("MASK", True)
    write_glb(mesh, tmp_path / "m.glb")
    loaded = trimesh.load(tmp_path / "m.glb", force="mesh", process=False)
    x, y, z = mesh.positions.T
    np.testing.assert_allclose(loaded.vertices, np.stack([x, z, -y], axis=1), atol=1e-7)  # Z-up -> Y-up
    np.testing.assert_allclose(loaded.visual.uv, mesh.uvs, atol=1e-6)  # trimesh undoes glTF's v flip
    assert loaded.visual.material.alphaMode == "MASK" and loaded.visual.material.doubleSided


def test_raw_gltf_uvs_address_rows_top_first_and_material_fields() -> None:
    mesh = make_mesh("BLEND")
    mesh.uvs[:] = 0.5
    mesh.uvs[0] = (0.5, 1.0 - 0.5 / 64)  # v near 1: the top texel row in our convention
    mesh.uvs[1] = (0.5, 0.5 / 64)  # v near 0: the bottom row
    gltf = gl.GLTF2.load_from_bytes(glb_bytes(mesh))
    blob = gltf.binary_blob()
    acc = gltf.accessors[gltf.meshes[0].primitives[0].attributes.TEXCOORD_0]
    view = gltf.bufferViews[acc.bufferView]
    uv = np.frombuffer(blob, np.float32, acc.count * 2, view.byteOffset).reshape(-1, 2)
    image = gltf.images[gltf.textures[gltf.materials[0].pbrMetallicRoughness.baseColorTexture.index].source]
    assert image.mimeType == "image/png"
    iv = gltf.bufferViews[image.bufferView]
    pixels = np.array(Image.open(io.BytesIO(blob[iv.byteOffset:iv.byteOffset + iv.byteLength])))
    # glTF samples image row floor(v * H) from the top.
    assert tuple(pixels[int(uv[0, 1] * 64), 0, :3]) == (255, 0, 0)
    assert tuple(pixels[int(uv[1, 1] * 64), 0, :3]) == (0, 0, 255)
    mat = gltf.materials[0]
    assert mat.alphaMode == "BLEND" and mat.alphaCutoff is None and not mat.doubleSided
    assert mat.pbrMetallicRoughness.metallicRoughnessTexture is not None
    pos = gltf.accessors[gltf.meshes[0].primitives[0].attributes.POSITION]
    assert pos.min is not None and pos.max is not None


def test_bad_meshes_are_refused() -> None:
    mesh = make_mesh()
    mesh.indices = mesh.indices + len(mesh.positions)
    with pytest.raises(ValueError, match="out of range"):
        glb_bytes(mesh)
    mesh = make_mesh()
    mesh.base_color = mesh.base_color[..., :3]
    with pytest.raises(ValueError, match="base_color"):
        glb_bytes(mesh)
    mesh = make_mesh()
    mesh.alpha_mode = "AUTO"
    with pytest.raises(ValueError, match="alpha_mode"):
        glb_bytes(mesh)
