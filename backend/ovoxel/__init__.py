"""The O-Voxel and its geometry (the reference's `o_voxel` role), beneath both the model code and the asset code:
the O-Voxel type (`ovoxel`), flexible dual-grid mesh extraction (`dual_grid`), the mesh -> O-Voxel voxeliser
(`encode`), closest points on a triangle mesh (`nearest`) and the ragged-segment primitives they share
(`segments`)."""
