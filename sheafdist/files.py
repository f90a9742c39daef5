"""Reading and writing the project's files: never pickle, never a partial file."""

from __future__ import annotations

import os
import tempfile
import zipfile

import numpy as np

from .errors import InputError

# what np.load raises for a directory, an empty or truncated file, pickled data
_UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile)

# dtype kinds read as real numbers: bool, signed and unsigned integers, floats
# (never strings, bytes, complex numbers, dates or objects)
REAL_KINDS = "biuf"
# the largest magnitude of a value fed to the energy, which squares and sums it:
# about the square root of the largest float64 (1.8e308), with room for the sums
MAX_MAGNITUDE = 1e150


def _unreadable(arg: str, path: str, exc: Exception, fix: str) -> InputError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    # numpy reads anything it does not recognise as a pickle, and its message then
    # advises allow_pickle=True, which is exactly what must not be done here
    if "pickle" in reason:
        reason = "pickled or unrecognised content, never unpickled"
    return InputError(arg, f"{path} ({reason})", fix)


def _open(path: str, arg: str, fix: str):
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(arg, path, "no such file; check the path") from None
    except _UNREADABLE as exc:
        raise _unreadable(arg, path, exc, fix) from None


def read_npz(path: str, arg: str) -> dict[str, np.ndarray]:
    """Every array of an ``.npz``; any failure to read one becomes an InputError."""
    fix = "give an .npz of named numeric arrays (np.savez)"
    f = _open(path, arg, fix)
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise InputError(arg, f"{path} holding one bare array", fix)
    with f:
        # members are decoded lazily, so a damaged one fails only here
        try:
            return {k: f[k] for k in f.files}
        except _UNREADABLE as exc:
            raise _unreadable(arg, path, exc, fix) from None


def read_npy(path: str, arg: str, fix: str) -> np.ndarray:
    """One array from an ``.npy`` file."""
    x = _open(path, arg, fix)
    if not isinstance(x, np.ndarray):
        x.close()
        raise InputError(arg, f"{path}, an .npz archive", fix)
    return x


def real_array(value, arg: str, what: str, where: str = "",
               fix: str = "store real numbers") -> np.ndarray:
    """``value`` as a float64 array; an InputError naming ``arg`` unless its
    dtype holds real numbers (complex values are refused, not cut to their real
    part; strings are refused, not parsed)."""
    value = np.asarray(value)
    if value.dtype.kind not in REAL_KINDS:
        raise InputError(arg, f"{what} of dtype {value.dtype}{where}", fix)
    return value.astype(np.float64)


def check_magnitude(value: np.ndarray, arg: str, what: str, fix: str) -> None:
    """Refuse finite values too large for the energy, which squares them."""
    if value.size and float(np.max(np.abs(value))) > MAX_MAGNITUDE:
        raise InputError(arg, f"{what} with values up to "
                         f"{float(np.max(np.abs(value))):.3g}", f"the energy squares "
                         f"them, which overflows float64; {fix} (to below "
                         f"{MAX_MAGNITUDE:g})")


def atomic_savez(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write an ``.npz`` to a temporary file beside ``path``, then rename it over.

    A crash half-way leaves the previous file untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private; give it the mode a plain open would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, with the
    mode a plain ``open`` would give."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
