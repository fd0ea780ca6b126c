"""Files: written all-or-nothing (a crash mid-write leaves the previous file or folder, never half of one), and
TOML read the same way on every supported Python."""

import os
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the `tomli` package (a dependency there)
    import tomli as tomllib

TOMLDecodeError = tomllib.TOMLDecodeError  # a ValueError


def loads_toml(text: str) -> dict:
    """A TOML document as a dict (the one TOML loader of the package)."""
    return tomllib.loads(text)


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only be read by setting it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_mode(folder=False) -> int:
    """The mode open() or mkdir() would give a new file or folder: 0o666 / 0o777 minus the umask.
    mkstemp and mkdtemp make theirs private (0o600 / 0o700), which a UI running as another user cannot read."""
    return (0o777 if folder else 0o666) & ~current_umask()


def atomic_write(path, write_fn, *, mode="wb"):
    """write_fn(file) fills a temp file in the same folder; it is fsynced, then renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, ordinary_mode())
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
