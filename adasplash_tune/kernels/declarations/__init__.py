"""Kernel declarations, one module per kernel family, each exposing ``SPECS: {backend: KernelSpec}``."""
