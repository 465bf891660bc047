"""Find the compiled CBLAS shim, or compile it into a per-user cache.

The shim is normally built at install time (see ``setup.py``) and sits next to
this file as ``_cblas_shim<extension suffix>``. A source checkout that was never
built has no such file; there we compile ``cblas_shim.c`` with the system C
compiler once and keep the result under ``~/.cache/mlxtune/``, keyed by the
source's hash so an edited shim is never served stale.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
SOURCE = _HERE / "cblas_shim.c"
# The module name setup.py gives the extension (mlxtune.blas._cblas_shim).
BUILT_NAME = "_cblas_shim"

_COMPILE_TIMEOUT_S = 120


class ShimUnavailable(RuntimeError):
    """No compiled shim was installed and none could be compiled here."""


def installed_shim() -> Path | None:
    """The shim built at install time, if there is one."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = _HERE / f"{BUILT_NAME}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlxtune"


def _find_compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


def compiled_shim() -> Path:
    """Compile the shim into the cache (once per source version) and return its path."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    target = cache_dir() / f"cblas_shim-{digest}.so"
    if target.is_file():
        return target

    compiler = _find_compiler()
    if compiler is None:
        raise ShimUnavailable(
            "the CBLAS shim was not built at install time and no C compiler (cc) was found "
            "to build it; reinstall mlxtune with a compiler available"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build to a private name and rename: several workers may start at once, and
    # none of them may load a half-written library.
    fd, tmp_name = tempfile.mkstemp(prefix=".cblas_shim-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, "-O2", "-shared", "-fPIC", "-o", tmp_name, str(SOURCE)],
            capture_output=True,
            text=True,
            timeout=_COMPILE_TIMEOUT_S,
        )
        if result.returncode != 0:
            raise ShimUnavailable(
                f"compiling the CBLAS shim with {compiler} failed: {result.stderr.strip()[-500:]}"
            )
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target


def shim_path() -> tuple[Path, str]:
    """The shim to load and where it came from ("installed" or "compiled")."""
    if (path := installed_shim()) is not None:
        return path, "installed"
    return compiled_shim(), "compiled"
