"""Kernels: declarations, the fp64 oracle, the Triton kernels and the torch backend."""
