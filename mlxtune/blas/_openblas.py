"""Load the OpenBLAS shipped by scipy-openblas32 and ask the dynamic linker about symbols."""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path


def load() -> ctypes.CDLL:
    """dlopen scipy-openblas32's library into the global symbol scope.

    RTLD_GLOBAL is what lets the shim's undefined ``scipy_cblas_*`` references
    resolve against it. OpenBLAS reads OPENBLAS_NUM_THREADS when it is loaded,
    so a value set by the user is honoured without us touching it; unset,
    OpenBLAS uses one thread per available core.
    """
    import scipy_openblas32

    path = Path(scipy_openblas32.get_lib_dir()) / scipy_openblas32.get_library(fullname=True)
    return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


def describe(lib: ctypes.CDLL) -> tuple[str, int]:
    """A display name such as "openblas 0.3.30 Haswell (scipy-openblas32)" and the thread count."""
    get_config = lib.scipy_openblas_get_config
    get_config.restype = ctypes.c_char_p
    config = get_config().decode(errors="replace")
    # e.g. "OpenBLAS 0.3.30 DYNAMIC_ARCH NO_AFFINITY Haswell MAX_THREADS=64"
    match = re.match(r"OpenBLAS\s+(\S+)", config)
    version = match.group(1) if match else "?"
    # The kernel family OpenBLAS picked for this CPU at load time (DYNAMIC_ARCH builds).
    get_core = lib.scipy_openblas_get_corename
    get_core.restype = ctypes.c_char_p
    core = (get_core() or b"").decode(errors="replace").strip()
    name = f"openblas {version}{' ' + core if core else ''} (scipy-openblas32)"

    get_threads = lib.scipy_openblas_get_num_threads
    get_threads.restype = ctypes.c_int
    return name, int(get_threads())


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def global_provider(symbol: str) -> str | None:
    """The file whose definition of ``symbol`` the global lookup scope finds first.

    That is the definition libmlx.so will bind to when it is loaded next, so it
    tells whether our shim really won over the bundled reference BLAS (or lost
    to, say, an LD_PRELOADed library). None when the symbol is not defined yet.
    """
    process = ctypes.CDLL(None)
    try:
        address = ctypes.cast(getattr(process, symbol), ctypes.c_void_p).value
    except AttributeError:
        return None
    info = _DlInfo()
    if not process.dladdr(ctypes.c_void_p(address), ctypes.byref(info)) or not info.dli_fname:
        return "?"
    return os.path.realpath(info.dli_fname.decode(errors="replace"))
