"""The AVX2 kernels, which a machine without AVX-512 runs, pass the same kernel tests as the ones this machine runs.

bcnp compiles csrc/ for the machine it is installed on (-march=native), so on an AVX-512 machine the AVX2 paths of
the decode kernels are never built. This test builds bcnp._quant again with AVX-512 turned off, into a copy of the
package, and runs tests/test_quant.py, tests/test_matvec.py and tests/test_quant_batch.py against that copy."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

BUILD = """
import sys, numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
sys.argv = ["setup.py", "build_ext", "--inplace", "-q"]
flags = ["-O2", "-fopenmp", "-march=native", "-mno-avx512f"]
setup(ext_modules=cythonize([Extension("bcnp._quant", ["csrc/quant.pyx"], include_dirs=[numpy.get_include()],
                                       extra_compile_args=flags, extra_link_args=["-fopenmp"])],
                            compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False,
                                                 "cdivision": True, "initializedcheck": False}, quiet=True))
"""


def cpu_flags():
    try:
        return Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split()
    except (OSError, IndexError):
        return []


@pytest.mark.slow
@pytest.mark.skipif(not {"avx2", "f16c", "fma"} <= set(cpu_flags()), reason="this CPU cannot run AVX2 code")
def test_the_avx2_kernels_pass_the_kernel_tests(tmp_path):
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc", ignore=shutil.ignore_patterns("*.c"))
    shutil.copytree(ROOT / "bcnp", tmp_path / "bcnp", ignore=shutil.ignore_patterns("_quant*.so", "__pycache__"))
    build = subprocess.run([sys.executable, "-c", BUILD], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]

    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT / 'tests'}"}
    simd = subprocess.run([sys.executable, "-c", "import bcnp, bcnp._quant as q; print(bcnp.__file__, q.SIMD)"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert simd.stdout.split() == [str(tmp_path / "bcnp" / "__init__.py"), "avx2"], simd.stdout + simd.stderr

    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                            str(ROOT / "tests" / "test_quant.py"), str(ROOT / "tests" / "test_matvec.py"),
                            str(ROOT / "tests" / "test_quant_batch.py")],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout.splitlines()[-1]
