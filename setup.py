"""Build the Cython kernels in csrc/ as bcnp._<name> extension modules.

A source build compiles with -O3 -march=native (it runs where it was built); set BCNP_PORTABLE=1 when building
a wheel for other machines. OpenMP is used when the compiler supports it (prange in the kernels).
"""
import glob
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

portable = os.environ.get("BCNP_PORTABLE", "0") == "1"
compile_args = ["-O3", "-fopenmp"] + ([] if portable else ["-march=native"])
link_args = ["-fopenmp"]

extensions = [
    Extension(
        "bcnp._" + os.path.splitext(os.path.basename(path))[0],
        [path],
        include_dirs=[numpy.get_include()],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    for path in sorted(glob.glob("csrc/*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False,
                             "cdivision": True, "initializedcheck": False},
    )
)
