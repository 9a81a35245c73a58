"""Compile Triton launches for a GPU without one, and read what the compiler made of them.

A launch ``kernel[grid](*args, **kwargs)`` is specialised by Triton's JIT before it compiles: integers divisible by 16
and 16-byte aligned pointers become hints, integers equal to 1 constants. :func:`compile_launch` does the same for a
target GPU (default: an H100, sm_90) from the same arguments, CPU tensors standing in for GPU ones (their dtypes and
alignment are what the compiler sees), through Triton's own compiler and its bundled ``ptxas``. :func:`sass_stats`
reads the machine code with the bundled ``cuobjdump``: registers, the instruction mix and the length of the main
loop. The tests compile every kernel variant so; ``benchmarks/sass_triton.py`` compares tile configurations by the
instructions their loops issue (a static measure: no timing).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter


def compile_launch(kernel, args: tuple, kwargs: dict, target: tuple = ("cuda", 90, 32)):
    """``(specialisation key, build)`` for a launch of the JIT function ``kernel``: ``build()`` compiles it for
    ``target`` (backend, compute capability, warp size) as the JIT would specialise these arguments; equal keys
    compile to the same code."""
    import triton

    try:  # (the JIT's own specialisation: internals that have moved between Triton releases)
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend
        from triton.compiler import ASTSource
        from triton.runtime.jit import create_function_from_signature

        gpu = GPUTarget(*target)
        backend = CUDABackend(gpu)
        bound, spec, opts = create_function_from_signature(kernel.signature, kernel.params, backend)(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    except (ImportError, AttributeError, TypeError) as e:
        raise NotImplementedError(f"compiling a launch without a GPU needs Triton's JIT internals of 3.9 "
                                  f"(this is Triton {triton.__version__}: {type(e).__name__}: {e})") from e
    key = (kernel.__name__, str(spec), str(sorted(options.__dict__.items())))
    return key, lambda: triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=gpu,
                                       options=options.__dict__)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_OP = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T\d]\s+)?([A-Z][A-Z0-9_]*)(\S*)(?:\s+(0x[0-9a-f]+))?", re.M)


def sass_stats(compiled) -> dict:
    """What the machine code of a compiled kernel holds: ``registers`` a thread, ``shared`` bytes, ``instructions``
    in all and by opcode (``ops``: ``FFMA``, ``HMMA``, ``LDG``, ``LDS``, ``STL`` (a register spill), ...), ``loop``
    the instructions of the longest loop body (the span of its backward branch: a GEMM's K loop), ``loop_ops``
    its opcodes and ``loop_waits`` its waits for tensor-core products (``WARPGROUP.DEPBAR``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        path = f.name
    try:
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                               check=True).stdout
    finally:
        os.unlink(path)
    code = [(int(m.group(1), 16), m.group(2), m.group(3), m.group(4)) for m in _OP.finditer(sass)]
    ops = Counter(op for _, op, _, _ in code)
    span = (0, -1)
    for addr, op, _, target in code:
        if op == "BRA" and target is not None and int(target, 16) < addr \
                and addr - int(target, 16) > span[1] - span[0]:
            span = (int(target, 16), addr)
    loop_ops = Counter(op for addr, op, _, _ in code if span[0] <= addr <= span[1])
    # waits for the warpgroup's tensor-core products (WARPGROUP.DEPBAR): one a step keeps them in flight while the
    # next operands load; one after each product means ptxas serialised them
    loop_waits = sum(1 for addr, op, suffix, _ in code if span[0] <= addr <= span[1] and op == "WARPGROUP"
                     and suffix.startswith(".DEPBAR"))
    regs = re.search(r"REG:(\d+)", usage)
    return {"registers": int(regs.group(1)) if regs else None, "shared": compiled.metadata.shared,
            "instructions": sum(ops.values()), "loop": sum(loop_ops.values()), "ops": dict(ops),
            "loop_ops": dict(loop_ops), "loop_waits": loop_waits}
