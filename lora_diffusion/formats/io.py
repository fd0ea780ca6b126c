"""Files: written all-or-nothing (a crash mid-write leaves the previous file or folder, never half of one), and
TOML read the same way on every supported Python.

    atomic_write(path, write_fn)              one file: a temp file beside it, fsynced, renamed over it
    build_folder_atomically(folder, fill)     one folder: fill(staging) beside it, then replace_folder
    replace_folder(staging, folder)           the one folder replacer (what every folder save goes through)
"""

import os
import secrets
import shutil
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


def write_error(error: OSError, what) -> OSError:
    """The same OSError (class, errno and reason kept) naming what was being written: the system's own
    "[Errno 28] No space left on device" names no file, or only a temp file."""
    if error.errno:
        args = (error.errno, error.strerror or str(error), str(what))  # str(): "[Errno 28] No space ...: 'what'"
    else:
        args = (f"could not write {what}: {error}",)
    try:
        new = type(error)(*args)
    except TypeError:  # a subclass with a constructor of its own
        new = OSError(*args)
    new.written = str(what)  # an outer writer (a folder around this file) keeps this name
    return new


def atomic_write(path, write_fn, *, mode="wb"):
    """write_fn(file) fills a temp file in the same folder; it is fsynced, then renamed over `path`. An OSError
    (disk full, permissions) is raised again with `path` in its message; the temp file is removed."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, ordinary_mode())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(error, OSError) and not hasattr(error, "written"):
            raise write_error(error, path) from error
        raise
    return path


# -- folders ------------------------------------------------------------------------------------------------------


def _fsync_path(path, folder=False):
    """Flush one file's or folder's entry to disk. Folders cannot be opened for fsync everywhere (Windows)."""
    try:
        fd = os.open(path, (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if folder else os.O_RDONLY)
    except OSError:
        if folder:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not folder:
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder):
    """Every file under `folder` on disk, then the folders that name them, so a rename of `folder` that
    survives a crash never points at files whose data was lost (symlinks are left as they are)."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                _fsync_path(os.path.join(root, name))
        _fsync_path(root, folder=True)


def new_staging_folder(target, *, fixed_name=False) -> Path:
    """An empty folder beside `target` (same file system, so the final rename is atomic) to fill and hand to
    replace_folder, with the mode of an ordinary new folder (mkdtemp's would be 0o700, hiding a dataset or a
    model from other users). fixed_name: at `<target>.tmp`, a name other processes can find without being told
    (a leftover of an interrupted save there is deleted first); else a fresh unique `.<name>.tmp-XXXX`."""
    target = Path(target).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    if fixed_name:
        staging = target.with_name(target.name + ".tmp")
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
    else:
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    os.chmod(staging, ordinary_mode(folder=True))
    return staging


def old_folder_names(target) -> list:
    """Previous versions of `target` that replace_folder moved aside and could not delete (an interrupted save
    between its two renames leaves the previous version here, under `.<name>.old-XXXX`)."""
    target = Path(target)
    return sorted(target.parent.glob(f".{target.name}.old-*")) if target.parent.is_dir() else []


def replace_folder(staging, target, *, sync=True) -> Path:
    """Move the filled folder `staging` (beside `target`, see new_staging_folder) to `target`.

    An existing `target` is first renamed aside to a fresh `.<name>.old-XXXX` and deleted only after the new
    folder is in place, so at every moment one complete version exists: a crash leaves either the old `target`,
    or the new one, or (between the two renames) the old one under its .old- name. Nothing else is deleted.
    sync: the staging folder's files and folders are fsynced before the rename, the parent folder after it."""
    staging, target = Path(staging), Path(target).expanduser()
    if sync:
        _fsync_tree(staging)
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)  # the previous version back under its name
        raise
    if sync:
        _fsync_path(target.parent, folder=True)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    return target


def build_folder_atomically(target, fill, *, sync=True):
    """Call fill(staging) on a fresh folder next to `target`, then replace_folder it into place, so an interrupted
    run never leaves a half-written folder under the final name (the staging folder is removed on failure).
    Returns what fill returned."""
    try:
        staging = new_staging_folder(target)
    except OSError as error:
        raise write_error(error, target) from error
    try:
        result = fill(staging)
        replace_folder(staging, target, sync=sync)
        return result
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) and not hasattr(error, "written"):
            raise write_error(error, target) from error
        raise


def refused_pickle_detail(error) -> str:
    """The line of torch's weights-only error that names what was refused, without torch's advice."""
    for line in str(error).splitlines():
        if "unsupported" in line.lower():
            return line.strip().removeprefix("WeightsUnpickler error:").strip().split(" was not")[0].rstrip(".")
    return "a pickle torch's safe loader does not accept"
