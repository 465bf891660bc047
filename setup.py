"""Build step for the one compiled piece of mlxtune; all metadata is in pyproject.toml.

mlxtune/blas/cblas_shim.c is a plain shared library (loaded with ctypes, never
imported), exporting the CBLAS names MLX's Linux CPU backend links against and
forwarding them to OpenBLAS. It is only useful on Linux, so it is only built there.
"""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(
        Extension(
            "mlxtune.blas._cblas_shim",
            sources=["mlxtune/blas/cblas_shim.c"],
            extra_compile_args=["-O2"],
            # A missing compiler must not make the package uninstallable: the shim
            # is then compiled on first use if possible, else MLX keeps its slow
            # BLAS and mlxtune.blas.activate() says why.
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
