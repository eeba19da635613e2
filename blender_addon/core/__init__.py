"""The add-on's Blender-free half: settings, result checking and conversion, jobs, the local backend process.

Nothing here imports bpy (a test enforces it), so all of it runs and is tested in plain Python; `..blender` is the
thin layer that turns these values into Blender data and UI.
"""
