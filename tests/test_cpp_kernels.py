"""The torch-free C++ kernel tables (csrc/kernels/*.h) checked by tests/cpp/test_kernels.cpp against float64, built
with the C++ compiler that builds the extension (`make test-cpp`); `make test-aarch64` runs the same checks for
aarch64 under qemu-user (CI)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_cpp_kernel_tables_match_float64(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on this machine (the C++ extension could not have been built either)")
    exe = tmp_path / "test_kernels"
    srcs = ["tests/cpp/test_kernels.cpp", "csrc/kernels_generic.cpp", "csrc/kernels_avx2.cpp",
            "csrc/kernels_avx512.cpp"]
    subprocess.run([cxx, "-O2", "-std=c++17", "-fopenmp-simd", "-fno-trapping-math", "-Wno-psabi", "-o", str(exe),
                    *srcs], cwd=ROOT, check=True, capture_output=True)
    res = subprocess.run([str(exe)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout
    assert res.stdout.startswith("ok: ") and " 0 failed" in res.stdout, res.stdout
