"""Avatars: an identity's UV maps through the UPM, saved as a bundle (`bundle.py`), driven by
cameras, expression codes, gaze or an ARKit track (`drive.py`, `arkit.py`) and rendered with the
JAX rasteriser or the exported PyTorch runtime."""
