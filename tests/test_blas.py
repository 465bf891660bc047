"""mlxtune.blas: MLX's Linux CPU backend really runs on OpenBLAS after activate().

Activation only works before libmlx.so is loaded, and pytest's process may
have imported mlx already, so every check that touches MLX runs in a fresh
interpreter. "Really runs" is judged by speed: a preload that silently fails
leaves MLX on its reference BLAS, which is more than an order of magnitude slower.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
    reason="OpenBLAS is wired up for MLX on Linux x86_64",
)

# Activates, measures, and checks each GEMM the shim forwards (sgemm, dgemm,
# cgemm) against numpy, with transposed and non-square operands so a wrong
# argument order in the shim would show.
_CHILD = textwrap.dedent(
    """
    import json
    from mlxtune import blas

    info = blas.activate()
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    errors = {}
    with mx.stream(mx.cpu):
        # mx.array() narrows float64 to float32 unless told otherwise.
        for dtype, mx_dtype in ((np.float32, mx.float32), (np.float64, mx.float64),
                                (np.complex64, mx.complex64)):
            a = rng.standard_normal((67, 131)).astype(dtype)
            b = rng.standard_normal((45, 131)).astype(dtype)
            if dtype == np.complex64:
                a = a + 1j * rng.standard_normal(a.shape).astype(np.float32)
                b = b - 1j * rng.standard_normal(b.shape).astype(np.float32)
            got = np.array(mx.matmul(mx.array(a, mx_dtype), mx.array(b, mx_dtype).T))
            want = a.astype(np.complex128 if dtype == np.complex64 else np.float64) @ b.T
            errors[np.dtype(dtype).name] = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))

    gflops = blas.measure_gflops(256, repeats=REPEATS)
    print(json.dumps({
        "info": vars(info),
        "same_info_again": blas.activate() is info,
        "gflops": gflops,
        "relative_errors": errors,
    }))
    """
)


def _run_child(code: str, **env_overrides: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLXTUNE_BLAS"}
    env.update(env_overrides)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    # One OpenBLAS thread: on a small shared machine two threads waiting on each
    # other make timings erratic; one thread is still far faster than the
    # reference BLAS, and it checks that OPENBLAS_NUM_THREADS is honoured.
    openblas = _run_child(_CHILD.replace("REPEATS", "30"), OPENBLAS_NUM_THREADS="1")
    bundled = _run_child(_CHILD.replace("REPEATS", "5"), MLXTUNE_BLAS="bundled")
    return {"openblas": openblas, "bundled": bundled}


def test_activation_succeeds_by_default(runs):
    info = runs["openblas"]["info"]
    assert info["active"], info["reason"]
    assert info["name"].startswith("openblas ") and "scipy-openblas32" in info["name"]
    assert info["threads"] == 1  # from OPENBLAS_NUM_THREADS
    assert runs["openblas"]["same_info_again"]


def test_bundled_opt_out(runs):
    info = runs["bundled"]["info"]
    assert not info["active"]
    assert info["name"] == "mlx bundled reference BLAS"
    assert "MLXTUNE_BLAS=bundled" in info["reason"]


def test_openblas_is_much_faster_than_bundled(runs):
    # Measured ≈25-50× on a 2-core box; 5× leaves room for a noisy neighbour
    # while still failing if the preload silently did nothing.
    fast, slow = runs["openblas"]["gflops"], runs["bundled"]["gflops"]
    assert fast > 5 * slow, f"openblas {fast:.1f} GFLOP/s vs bundled {slow:.1f} GFLOP/s"


@pytest.mark.parametrize("mode", ["openblas", "bundled"])
@pytest.mark.parametrize(
    "dtype, tolerance", [("float32", 1e-5), ("float64", 1e-12), ("complex64", 1e-5)]
)
def test_matmul_matches_numpy(runs, mode, dtype, tolerance):
    assert runs[mode]["relative_errors"][dtype] < tolerance


def test_activating_after_mlx_import_reports_inactive():
    result = _run_child(
        textwrap.dedent(
            """
            import json
            import mlx.core
            from mlxtune import blas
            print(json.dumps(vars(blas.activate())))
            """
        )
    )
    assert not result["active"]
    assert result["name"] == "mlx bundled reference BLAS"
    assert "imported before" in result["reason"]


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_falls_back_to_compiling_the_shim(tmp_path, runs):
    # A source checkout that was never built has no installed shim: activate()
    # compiles one into the user's cache and still switches MLX to OpenBLAS.
    code = textwrap.dedent(
        """
        import json
        from mlxtune import blas
        from mlxtune.blas import _shim

        _shim.installed_shim = lambda: None
        info = blas.activate()
        print(json.dumps(dict(vars(info), gflops=blas.measure_gflops(256, repeats=20))))
        """
    )
    result = _run_child(code, XDG_CACHE_HOME=str(tmp_path), OPENBLAS_NUM_THREADS="1")
    assert result["active"], result["reason"]
    assert "(compiled)" in result["reason"]
    assert len(list((tmp_path / "mlxtune").glob("cblas_shim-*.so"))) == 1
    assert result["gflops"] > 5 * runs["bundled"]["gflops"]


def test_a_blas_preloaded_by_someone_else_is_reported():
    # With another library's cblas_sgemm first in the global scope, MLX binds to
    # that one; activate() must say so rather than claim OpenBLAS. MLX's own
    # reference BLAS stands in for "another library".
    import importlib.util

    libs = Path(importlib.util.find_spec("mlx").submodule_search_locations[0]).parent
    bundled = next((libs / "mlx_cpu.libs").glob("libblas-*.so*"), None)
    if bundled is None:
        pytest.skip("this mlx wheel does not bundle a reference BLAS")
    code = "import json; from mlxtune import blas; print(json.dumps(vars(blas.activate())))"
    result = _run_child(code, LD_PRELOAD=str(bundled))
    assert not result["active"]
    assert "already comes from" in result["reason"] and bundled.name in result["reason"]


def test_macos_is_a_no_op(monkeypatch):
    # _decide() is the uncached core of activate(); it loads nothing on macOS.
    from mlxtune import blas

    monkeypatch.setattr(sys, "platform", "darwin")
    info = blas._decide()
    assert (info.name, info.active) == ("accelerate", False)
