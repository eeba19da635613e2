"""O-Voxel -> textured mesh: dual-grid mesh extraction, the mesh -> O-Voxel encoder, cleanup, simplification,
UV unwrapping, PBR baking and GLB export (entry point: `postprocess.build_textured_mesh`)."""
