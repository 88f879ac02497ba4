"""Packaged config caches, one read-only SQLite file per GPU model (package data in the wheel).

A file is named after the GPU's name as torch reports it (``locations.shipped_name``):
``NVIDIA H200`` -> ``nvidia-h200.sqlite``. Make one on the tuned machine with

    adasplash-tune export adasplash_tune/cache/shipped/nvidia-h200.sqlite --device "NVIDIA H200"

(an exported ``.sqlite`` is a single self-contained file). The loader opens these files
read-only and immutable, after the user cache and before the nearest-entry fallback.
"""
