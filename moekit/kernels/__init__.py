"""Device kernels. Each module here imports its kernel language (e.g. Triton) at import time, so import them lazily
from the code that dispatches to them (see :mod:`moekit.experts.triton_backend`)."""
