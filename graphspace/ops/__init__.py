"""Scatter and fused gather -> message -> aggregate ops with one dispatch point.

Backends: Triton kernels on CUDA, ``torch_scatter`` when installed, plain torch otherwise.
"""

from graphspace.ops.scatter import scatter

__all__ = ["scatter"]
