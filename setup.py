"""Builds the compiled stream loop and the int4, Q8_0 and Q4 row kernels; falls back to a pure-Python install when
asked or when compiling fails."""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NO_EXTENSIONS = os.environ.get("MINERCORE_NO_EXTENSIONS", "") not in ("", "0")

CYTHON_DIRECTIVES = {
    "language_level": "3",
    # Indices into the stream table are validated once at the Python boundary of each call.
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
}


class OptionalBuildExt(build_ext):
    """A compiler failure must not fail the install: the stream loop's pure-Python twin has the same API, and
    torch's int4 kernel gives the row kernel's products."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any toolchain failure means "install pure Python"
            print(f"minercore: no compiled extensions ({exc}); installing the pure-Python twin of the stream loop "
                  "(torch's int4 kernel serves every int4 product)", file=sys.stderr)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"minercore: {ext.name} not built ({exc}); {FALLBACKS[ext.name]}", file=sys.stderr)


FALLBACKS = {"minercore.text._streamloop_c": "installing the pure-Python twin",
             "minercore.runtime._frame_chunks": "frame chunks come and go through mmap as CPython makes them",
             "minercore.models._int4_rows": "torch's int4 kernel serves every int4 product",
             "minercore.models._q8_rows": "Q8_0 tensors are dequantized to the model's dtype",
             "minercore.models._q4_rows": "Q4_0 and Q4_1 tensors go through torch's int4 kernel",
             "minercore.models._q4_i8_rows": "Q4 layers multiply float rows under activations int8",
             "minercore.models._q8_i8_rows": "Q8_0 layers multiply float rows under activations int8",
             "minercore.models._step_attention": "decode steps attend through torch's matrix products",
             "minercore.models._block_step": "int8-row blocks step through one call per product"}


def kernel(name: str, uses: tuple[str, ...] = ()) -> Extension:
    """``minercore.models._<name>``: csrc/<name>.c (with its header and the kernels it ``uses``) behind its Cython
    wrapper. OpenMP's symbols
    resolve to the runtime torch has already loaded (it is imported first), so the kernel's threads are torch's
    own workers, not a second set competing for the cores."""
    return Extension(
        f"minercore.models._{name}",
        [f"csrc/_{name}.pyx", f"csrc/{name}.c", *(f"csrc/{used}.c" for used in uses)],
        include_dirs=["csrc"],
        depends=[f"csrc/{name}.h", *(f"csrc/{used}.h" for used in uses), "csrc/rows_tile.h", "csrc/rows_i8.h",
                 "csrc/cpu_features.h"],
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )


def extensions() -> list[Extension]:
    if NO_EXTENSIONS:
        print("minercore: MINERCORE_NO_EXTENSIONS is set; installing the pure-Python twin", file=sys.stderr)
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("minercore: Cython is not available; installing the pure-Python twin", file=sys.stderr)
        return []
    streamloop = Extension(
        "minercore.text._streamloop_c",
        ["csrc/_streamloop_c.pyx"],
        extra_compile_args=["-O3"],
    )
    frame_chunks = Extension(
        "minercore.runtime._frame_chunks",
        ["csrc/_frame_chunks.pyx", "csrc/frame_chunks.c"],
        include_dirs=["csrc"],
        depends=["csrc/frame_chunks.h"],
        extra_compile_args=["-O2"],
    )
    kernels = [kernel(name) for name in ("int4_rows", "q8_rows", "q4_rows", "q4_i8_rows", "q8_i8_rows",
                                                 "step_attention")]
    kernels.append(kernel("block_step", uses=("q4_i8_rows", "q8_i8_rows", "step_attention")))
    return cythonize([streamloop, frame_chunks, *kernels], compiler_directives=CYTHON_DIRECTIVES, quiet=True)


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
