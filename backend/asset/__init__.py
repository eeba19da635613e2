"""O-Voxel -> textured mesh: cleanup, simplification, UV unwrapping, PBR baking and GLB export (entry point:
`postprocess.build_textured_mesh`). The O-Voxel type and its geometry live in `backend.ovoxel`."""
