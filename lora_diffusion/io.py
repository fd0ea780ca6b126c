"""Writing files all-or-nothing: a crash mid-write leaves the previous file (or none), never half of one."""

import os
import tempfile
from pathlib import Path


def atomic_write(path, write_fn, *, mode="wb"):
    """write_fn(file) fills a temp file in the same folder; it is fsynced, then renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
