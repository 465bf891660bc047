"""Make MLX's Linux CPU backend use OpenBLAS instead of its bundled reference BLAS.

MLX's Linux CPU wheel links a reference (netlib) BLAS it bundles: a float32
matmul runs at a few GFLOP/s, which makes CPU training impractically slow.
libmlx.so takes exactly three symbols from that BLAS -- ``cblas_sgemm``,
``cblas_dgemm`` and ``cblas_cgemm`` -- and the dynamic linker looks them up in
the process's global scope before libmlx's own dependencies. So if a library
defining them is loaded with RTLD_GLOBAL *before* libmlx.so, MLX binds to it.

The OpenBLAS we depend on (the ``scipy-openblas32`` wheel) exports its functions
with a ``scipy_`` prefix, so a tiny C shim (``cblas_shim.c``, compiled at install
time) supplies the unprefixed names and forwards to it. :func:`activate` loads
both; it has to run before anything imports ``mlx.core``::

    from mlxtune import blas
    info = blas.activate()          # before `import mlx.core`
    import mlx.core as mx

``MLXTUNE_BLAS=bundled`` keeps MLX's own BLAS (benchmarks, debugging);
``MLXTUNE_BLAS=openblas`` asks for OpenBLAS, the default on Linux x86_64.
A failed activation never raises: it logs a warning and reports why, because a
slow BLAS is a performance problem, not a reason to stop a training service.
Since a wrong preload fails silently, :func:`measure_gflops` checks the speed
that is actually achieved.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mlxtune.blas import _openblas, _shim

__all__ = ["BlasInfo", "activate", "measure_gflops", "ENV_VAR"]

log = logging.getLogger(__name__)

ENV_VAR = "MLXTUNE_BLAS"
BUNDLED_NAME = "mlx bundled reference BLAS"

# The only BLAS symbols libmlx.so imports (checked with `nm -D` on mlx 0.32).
_GEMM_SYMBOL = "cblas_sgemm"


@dataclass(frozen=True)
class BlasInfo:
    """Which BLAS MLX's CPU backend uses in this process.

    ``active`` is true only when :func:`activate` switched MLX to OpenBLAS;
    ``reason`` says why it did or did not. ``threads`` is the BLAS's thread
    count: 1 for the single-threaded reference BLAS, 0 where the platform
    manages it (Accelerate on macOS).
    """

    name: str
    active: bool
    reason: str
    threads: int

    def __str__(self) -> str:
        state = "active" if self.active else "inactive"
        return f"{self.name} [{state}, {self.threads} threads]: {self.reason}"


_lock = threading.Lock()
_result: BlasInfo | None = None
# Loaded libraries stay referenced for the life of the process: MLX calls into them.
_loaded: list[ctypes.CDLL] = []


def activate() -> BlasInfo:
    """Route MLX's CPU matmuls to OpenBLAS, if this platform and process allow it.

    Idempotent: the first call decides, later calls return the same answer.
    Must run before ``mlx.core`` is imported; afterwards it reports inactive.
    """
    global _result
    with _lock:
        if _result is None:
            _result = _decide()
        return _result


def _decide() -> BlasInfo:
    choice = os.environ.get(ENV_VAR, "").strip().lower()
    if choice not in ("", "openblas", "bundled"):
        log.warning("%s=%r is not one of 'openblas', 'bundled'; using the default", ENV_VAR, choice)
        choice = ""

    if not sys.platform.startswith("linux"):
        if sys.platform == "darwin":
            return BlasInfo("accelerate", False, "macOS: MLX uses Apple's Accelerate", 0)
        return BlasInfo("platform default", False, f"no BLAS switch on {sys.platform}", 0)

    if choice == "bundled":
        return BlasInfo(BUNDLED_NAME, False, f"{ENV_VAR}=bundled", 1)
    if choice == "" and platform.machine() not in ("x86_64", "AMD64"):
        return BlasInfo(
            BUNDLED_NAME,
            False,
            f"OpenBLAS is the default on Linux x86_64 only; set {ENV_VAR}=openblas "
            f"to try it on {platform.machine()}",
            1,
        )

    if _mlx_loaded():
        info = _already_bound_info()
        log.warning("BLAS not switched: %s", info.reason)
        return info

    try:
        info = _load_openblas()
    except Exception as exc:  # never let a BLAS problem stop the process
        info = BlasInfo(BUNDLED_NAME, False, f"could not load OpenBLAS: {exc}", 1)
    if info.active:
        log.info("MLX CPU BLAS: %s", info)
    else:
        log.warning("OpenBLAS not activated for MLX: %s", info.reason)
    return info


def _load_openblas() -> BlasInfo:
    openblas = _openblas.load()
    _loaded.append(openblas)
    name, threads = _openblas.describe(openblas)

    shim, origin = _shim.shim_path()
    _loaded.append(ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL))

    # The symbol libmlx will bind to is whichever the global scope finds first;
    # make sure that is ours and not, say, another library preloaded earlier.
    provider = _openblas.global_provider(_GEMM_SYMBOL)
    if provider != os.path.realpath(shim):
        return BlasInfo(
            _provider_name(provider),
            False,
            f"{_GEMM_SYMBOL} already comes from {provider}, loaded before mlxtune's shim",
            0,
        )
    return BlasInfo(name, True, f"loaded before mlx.core via the CBLAS shim ({origin})", threads)


def _mlx_loaded() -> bool:
    """Whether libmlx.so is in the process already, whoever loaded it."""
    if "mlx.core" in sys.modules:
        return True
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return "/libmlx.so" in maps


def _already_bound_info() -> BlasInfo:
    provider = _openblas.global_provider(_GEMM_SYMBOL)
    return BlasInfo(
        _provider_name(provider),
        False,
        "mlx.core was imported before mlxtune.blas.activate(), so MLX has already bound "
        "its BLAS; call activate() before importing mlx (or anything that imports it)",
        1 if provider is None else 0,
    )


def _provider_name(provider: str | None) -> str:
    # Nothing global defines the symbol: libmlx uses the BLAS it bundles.
    if provider is None:
        return BUNDLED_NAME
    return f"{os.path.basename(provider)} (loaded by someone else)"


def measure_gflops(n: int = 512, repeats: int = 5) -> float:
    """GFLOP/s of a float32 n×n×n matmul on MLX's CPU device, best of ``repeats``.

    Measures whatever BLAS MLX really bound to, which is the only trustworthy
    check. Imports ``mlx.core``: call :func:`activate` first.
    """
    import mlx.core as mx

    with mx.stream(mx.cpu):
        a = mx.random.normal((n, n), dtype=mx.float32)
        b = mx.random.normal((n, n), dtype=mx.float32)
        mx.eval(a, b)
        # The first matmul pays one-off costs (thread pool start-up, page faults).
        mx.eval(a @ b)
        best = float("inf")
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            mx.eval(a @ b)
            best = min(best, time.perf_counter() - start)
    # Best-of rather than mean: on a shared machine the noise only ever adds time.
    return 2.0 * n**3 / best / 1e9
