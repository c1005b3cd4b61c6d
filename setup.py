"""Builds the optional C++ extension fastdistil._C (the `native` CPU backend); metadata lives in pyproject.toml.

Build against the installed torch: `pip install --no-build-isolation -e .` (an isolated build would install a
second torch, a multi-GB CUDA build, into the build environment). Without a compiler or torch's headers the
package installs without the extension and runs on the torch backend.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

# kernels/ maps to fastdistil.kernels (package_dir in pyproject.toml), never to a top-level `kernels`.
packages = find_packages(include=["fastdistil", "fastdistil.*"])
packages += ["fastdistil.kernels"] + ["fastdistil.kernels." + p for p in find_packages("kernels")]

ext_modules, cmdclass = [], {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if sources and os.environ.get("FASTDISTIL_NO_EXT", "0") == "0":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("fastdistil: torch is not importable at build time; skipping the C++ extension", file=sys.stderr)
    else:
        # No -march=native: the binary must run on any x86-64 CPU; the kernel tables (generic, avx2, avx512) are
        # compiled per ISA with pragmas and chosen at run time (csrc/dispatch.cpp). -fno-trapping-math: without it
        # GCC 12 leaves every loop with a select (erf, exp's clamp) scalar below AVX-512, which has masked ops; no
        # result changes (no reassociation, no FP-exception use here).
        ext_modules = [CppExtension("fastdistil._C", sources,
                                    extra_compile_args=["-O3", "-std=c++17", "-fopenmp", "-fno-trapping-math"],
                                    extra_link_args=["-fopenmp"])]
        # ninja compiles the sources in parallel (MAX_JOBS, default: every core); without it, one file at a time
        from torch.utils.cpp_extension import is_ninja_available
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=is_ninja_available())}

setup(packages=packages, ext_modules=ext_modules, cmdclass=cmdclass)
