"""O-Voxel -> mesh and PBR textures: dual-grid mesh extraction, then (later) cleanup, UV and baking."""
