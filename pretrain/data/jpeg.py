"""JPEG decoding for the training crop: only the pixels the crop needs.

`RoiDecoder` decodes one rectangle of a JPEG at a 1/2^k DCT scale with libjpeg-turbo's partial-decoding
API (csrc/jpeg_roi.c): rows below the crop are never entropy-decoded, rows above it are only
entropy-decoded, columns beside it skip the inverse DCT and colour conversion. The C file is compiled
on first use (like DeepSpeed's ops) against the system's libjpeg-turbo and cached; where that fails
(no C compiler or no libjpeg-turbo headers: `apt install libjpeg-dev`, `conda install libjpeg-turbo`),
`jpeg_roi: auto` falls back to whole-image decoding and says so once.

Environment: CC, CFLAGS, LDFLAGS for the build; SWIN_PRETRAIN_CACHE for where the library goes
(default ~/.cache/swin-pretrain).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import UserError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "jpeg_roi.c"
_ERR_LEN = 200


class JpegBuildError(UserError, RuntimeError):
    """The ROI decoder could not be compiled or loaded."""


def _build_command(out: str) -> list[str]:
    cc = shlex.split(os.environ.get("CC", "cc"))
    flags = shlex.split(os.environ.get("CFLAGS", "")) + ["-O2", "-shared", "-fPIC"]
    libs = shlex.split(os.environ.get("LDFLAGS", ""))
    if os.environ.get("CONDA_PREFIX"):  # a conda libjpeg-turbo
        prefix = os.environ["CONDA_PREFIX"]
        flags += [f"-I{prefix}/include"]
        libs += [f"-L{prefix}/lib", f"-Wl,-rpath,{prefix}/lib"]
    # --no-undefined: a plain IJG libjpeg (no jpeg_skip_scanlines) fails here, not at the first image.
    return [*cc, *flags, str(SOURCE), "-o", out, *libs, "-ljpeg", "-Wl,--no-undefined"]


def library_path() -> Path:
    """Where the compiled decoder lives: keyed by the source, the build command and the machine."""
    key = hashlib.sha1(SOURCE.read_bytes() + repr(_build_command("")).encode() + platform.machine().encode())
    root = Path(os.environ.get("SWIN_PRETRAIN_CACHE", Path.home() / ".cache" / "swin-pretrain"))
    return root / f"jpeg_roi-{key.hexdigest()[:16]}.so"


def build() -> Path:
    """Compile the decoder (once; concurrent builders each write a temp file and rename it)."""
    path = library_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    os.close(fd)
    cmd = _build_command(tmp)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        os.unlink(tmp)
        raise JpegBuildError(f"cannot run the C compiler ({e}); command: {shlex.join(cmd)}") from None
    if res.returncode != 0:
        os.unlink(tmp)
        raise JpegBuildError(
            f"compiling {SOURCE.name} failed (needs a C compiler and libjpeg-turbo >= 1.5 headers: "
            f"apt install libjpeg-dev, or conda install libjpeg-turbo; set CFLAGS/LDFLAGS for other "
            f"locations). Command: {shlex.join(cmd)}\n{res.stderr.strip()}")
    os.replace(tmp, path)
    return path


@lru_cache(maxsize=None)
def _load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.roi_decode.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p]
    lib.roi_decode.restype = ctypes.c_int
    return lib


class RoiDecoder:
    """Picklable handle on the compiled decoder (DataLoader workers load it on first use)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def decode(self, data: bytes, denom: int, x: int, y: int, w: int, h: int) -> Optional[np.ndarray]:
        """Rows y..y+h, columns x..x+w of the image scaled by 1/denom -> (h, w, 3) uint8 RGB.

        None when libjpeg reports corrupt or truncated data, or can't convert the colour space (CMYK):
        the caller then decodes the whole image with a decoder that raises on such data."""
        out = np.empty((h, w, 3), np.uint8)
        err = ctypes.create_string_buffer(_ERR_LEN)
        rc = _load(self.path).roi_decode(data, len(data), denom, x, y, w, h, out.ctypes.data, err)
        if rc == -2:
            raise ValueError(err.value.decode(errors="replace"))
        return out if rc == 0 else None


_fallback_logged = False


def roi_decoder(mode: str) -> Optional[RoiDecoder]:
    """The decoder for `aug.jpeg_roi`: "on" (required: raises with the compiler output), "auto" (None,
    logged once, where it can't be built), "off" (None)."""
    global _fallback_logged
    if mode == "off":
        return None
    try:
        path = build()
        _load(str(path))
        return RoiDecoder(path)
    except (JpegBuildError, OSError) as e:
        if mode == "on":
            raise JpegBuildError(f"aug.jpeg_roi is 'on' but the ROI JPEG decoder is unavailable: {e}") from None
        if not _fallback_logged:
            log.warning("ROI JPEG decoding unavailable, decoding whole images instead (slower; set "
                        "aug.jpeg_roi: off to silence): %s", str(e).splitlines()[0])
            _fallback_logged = True
        return None


if __name__ == "__main__":  # python -m pretrain.data.jpeg: build now, print where
    print(build())
