"""Optional native CPU kernels (``_native.c``), built on first use with the system C compiler and loaded with ctypes.

Some of gradkit's CPU hot paths are several eager PyTorch passes over one buffer (DGC's momentum update and row
maxima; Mesa's range, stochastic rounding and code conversion). The kernels here do each in one pass over
contiguous float32 CPU memory. They are an accelerator only: every caller keeps its PyTorch path, takes it for
other devices, dtypes and layouts, and falls back to it when no compiler is found or the build fails.

- The library is compiled once per source version, compiler and CPU (``-march=native``) into ``$GRADKIT_CACHE/native`` (see :mod:`gradkit._cache`),
  written to a temporary file and renamed, so concurrent processes never load a half-written file.
- ``GRADKIT_NATIVE=0`` turns the kernels off (the PyTorch paths are then used everywhere); ``CC`` picks the
  compiler (default ``cc``).
- The kernels run on one thread: callers use them only where that is faster than PyTorch's own threads.

>>> lib = native()          # None where no compiler is available or GRADKIT_NATIVE=0
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from ._cache import cache_dir

_SOURCE = Path(__file__).with_name("_native.c")
_lock = threading.Lock()
_state: dict[str, object] = {}

_i64, _f32, _int, _u64 = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_uint64
_p = ctypes.c_void_p
_SIGNATURES = {
    "gk_dgc_update": [_p, _p, _p, _i64, _f32, _int, _i64, _p],
    "gk_dgc_topk": [_p, _p, _i64, _i64, _p, _i64, _p, _p, _i64, _p, _p, _int],
    "gk_encode_block16": [_p, _i64, _i64, _p],
    "gk_all_finite": [_p, _i64],
    "gk_probe_drift": [_p, _p, _p, _i64],
    "gk_rows_topk": [_p, _i64, _i64, _i64, _p, _p],
    "gk_info_nce_fwd": [_p, _p, _i64, _p, _i64, _i64, _p, _i64, _i64, _i64, _f32, _u64, _p, _p, _p, _p, _p, _p, _p,
                        _p, _p, _f32, _p, _p],
    "gk_info_nce_bwd": [_f32, _p, _p, _i64, _p, _p, _i64, _i64, _p, _p, _p, _f32, _p, _p, _p, _i64, _p, _p, _i64,
                        _p, _p],
    "gk_group_minmax": [_p, _i64, _i64, _i64, _p, _p],
    "gk_quantize_u8": [_p, _p, _i64, _i64, _i64, _p, _p, _f32, _f32, _u64, _int],
    "gk_pack_u8": [_p, _p, _i64, _i64, _i64, _p, _p, _p, _int, _f32, _p, _p, _f32, _f32, _u64, _int],
    "gk_dequantize_u8": [_p, _p, _i64, _i64, _i64, _p, _p, _f32, _f32],
}
_RETURNS = {"gk_dgc_topk": _i64, "gk_all_finite": _int, "gk_encode_block16": _int,
            "gk_probe_drift": ctypes.c_double, "gk_info_nce_fwd": ctypes.c_double}  # the others return nothing
_MISSING = object()


def enabled() -> bool:
    """False when ``GRADKIT_NATIVE`` is set to 0, false or off."""
    return os.environ.get("GRADKIT_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")


@contextlib.contextmanager
def disabled():
    """Within this block the kernels are off (``GRADKIT_NATIVE=0``): to time or check the PyTorch paths."""
    old = os.environ.get("GRADKIT_NATIVE")
    os.environ["GRADKIT_NATIVE"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["GRADKIT_NATIVE"]
        else:
            os.environ["GRADKIT_NATIVE"] = old


def _cpu_id() -> bytes:
    """What the build is specific to: platform, machine and (where readable) the CPU's feature flags, since
    the library is compiled for the CPU it is built on."""
    ident = f"{sys.platform} {platform.machine()} {platform.processor()}".encode()
    try:
        with open("/proc/cpuinfo", "rb") as fh:
            ident += b"".join(sorted({ln for ln in fh if ln.startswith((b"flags", b"Features", b"isa"))}))
    except OSError:
        pass
    return ident


# -fno-math-errno keeps fabsf inline; -fno-trapping-math lets branch-free selects between floats vectorise (no
# kernel reads the floating-point exception flags); no -ffast-math: NaN and inf keep their meaning and sums
# their order
_FLAGS = ["-O3", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math"]


def _compile(compiler: str, source: bytes, out: str, flags: list[str]) -> bool:
    cmd = [compiler, *_FLAGS, *flags, "-x", "c", "-", "-o", out]
    try:
        return subprocess.run(cmd, input=source, capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _build(source: bytes) -> Path | None:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    tag = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(_FLAGS).encode(), _cpu_id()])).hexdigest()[:16]
    out_dir = cache_dir() / "native"
    lib = out_dir / f"gradkit_native_{tag}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        # the vector units of this CPU (AVX2 makes the hash and the integer maxima 2-3x faster than the
        # baseline instruction set); a compiler without -march=native builds for the baseline
        if not (_compile(compiler, source, tmp, ["-march=native"]) or _compile(compiler, source, tmp, [])):
            return None
        os.replace(tmp, lib)
        return lib
    except OSError:
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def native():
    """The loaded kernel library (a ``ctypes.CDLL`` with typed functions), or None when it is unavailable."""
    if not enabled():
        return None
    lib = _state.get("lib", _MISSING)
    if lib is not _MISSING:
        return lib
    with _lock:
        if "lib" not in _state:
            lib = None
            try:  # an unwritable cache, a failed build or a library that does not load: PyTorch paths only
                path = _build(_SOURCE.read_bytes())
                if path is not None:
                    lib = ctypes.CDLL(str(path))
                    for name, args in _SIGNATURES.items():
                        fn = getattr(lib, name)
                        fn.argtypes, fn.restype = args, _RETURNS.get(name)
            except (OSError, AttributeError):
                lib = None
            _state["lib"] = lib
        return _state["lib"]


def usable(*tensors) -> bool:
    """Whether the kernels can take these tensors: contiguous, on the CPU, and the library is loaded."""
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors) and native() is not None
