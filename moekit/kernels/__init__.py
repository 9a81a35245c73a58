"""Kernels. ``cpu`` (C kernels compiled on first use) and ``cpu_gemm`` (the fastest CPU GEMM library) import only
PyTorch; ``triton_moe`` imports Triton at import time, so import it lazily from the code that dispatches to it (see
:mod:`moekit.experts.triton_backend`)."""
