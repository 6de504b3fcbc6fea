"""fsspec-backed file helpers: read any URL, write whole files atomically (temp name, then rename)."""
from __future__ import annotations

import os
import tempfile
import uuid
from typing import Optional

import fsspec
from fsspec.implementations.local import LocalFileSystem


def read_bytes(url: str) -> bytes:
    """Read a whole local path or fsspec URL (s3://, gs://, hf://, http(s)://, memory://)."""
    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such file") from None


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write `data` to `url` so that readers see either the old file or the complete new one."""
    fs, path = fsspec.core.url_to_fs(url)
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
