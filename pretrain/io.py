"""fsspec-backed file helpers: read any URL, write whole files atomically (temp name, then rename)."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
import uuid
from typing import Optional

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import UserError


class UnreadableError(UserError):
    """A URL that exists or may exist but could not be read (network, credentials, permissions)."""


class MissingPackageError(UserError):
    """A URL whose filesystem lives in an optional package (s3fs, gcsfs, huggingface_hub, ...)."""


def _missing_package(url: str, e: ImportError) -> MissingPackageError:
    from fsspec.registry import known_implementations
    protocol = fsspec.utils.get_protocol(url)
    impl = known_implementations.get(protocol, {}).get("class", "")
    package = {"fsspec": "aiohttp requests"}.get(impl.split(".")[0], impl.split(".")[0]) or e.name or "?"
    package = package.replace("_", "-") if package == "huggingface_hub" else package
    return MissingPackageError(f"{url}: reading {protocol}:// needs the optional package {package} "
                               f"(pip install {package}): {str(e).splitlines()[0][:120]}")


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec's (filesystem, path) of `url`; a protocol whose package is missing is one line naming it."""
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise _missing_package(url, e) from None


def open_url(url: str, mode: str = "rb"):
    """fsspec.open(url, mode), as filesystem() reports a missing package."""
    try:
        return fsspec.open(url, mode)
    except ImportError as e:
        raise _missing_package(url, e) from None


def read_bytes(url: str) -> bytes:
    """Read a whole local path or fsspec URL (s3://, gs://, hf://, http(s)://, memory://)."""
    try:
        with open_url(url, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        # fsspec's HTTP filesystem raises FileNotFoundError for a refused connection too: only a missing
        # file (no cause, or the server's 404/410) is said to be missing.
        cause = e.__cause__
        if cause is None or getattr(cause, "status", None) in (404, 410):
            raise FileNotFoundError(f"{url}: no such file") from None
        raise _unreadable(url, cause) from None
    except UserError:
        raise
    except Exception as e:  # the network, credentials, a server's answer: never reported as a missing file
        raise _unreadable(url, e) from None


def _unreadable(url: str, cause: BaseException) -> UnreadableError:
    return UnreadableError(f"{url}: can't be read ({type(cause).__name__}: {str(cause).splitlines()[0][:160]}); "
                           "check the URL, the network and the credentials")


def save_failure(e: RuntimeError, path: str) -> BaseException:
    """torch.save's RuntimeError never says why a write failed ("PytorchStreamWriter failed writing file
    ..."): on a disk that is full now, the OSError(ENOSPC) every entry point reports in one line; else a
    one-line UserError naming `path`."""
    where = path if os.path.exists(path) else os.path.dirname(path) or "."
    try:
        usage = shutil.disk_usage(where)
    except OSError:
        usage = None
    if usage is not None and usage.free < (256 << 20):  # the failed write's partial file filled the rest
        return OSError(errno.ENOSPC, "No space left on device", path)
    return UserError(f"{path}: writing failed ({str(e).splitlines()[0][:160]}); check that disk (quota, "
                     "permissions, I/O errors), then resume with --resume auto")


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write `data` to `url` so that readers see either the old file or the complete new one."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        parent = os.path.dirname(os.path.abspath(path)) or "."
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-", suffix="-" + os.path.basename(path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    # Object stores: upload under a temporary key, then move; a reader never sees a partial object.
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}" if parent else f".tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def write_safetensors(url: str, state: dict, metadata: Optional[dict[str, str]] = None) -> None:
    """A state dict as a safetensors file (CPU, contiguous), written atomically: the one writer of
    exports, run checkpoints and EMA files."""
    from safetensors.torch import save
    write_bytes_atomic(url, save({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata=metadata))
