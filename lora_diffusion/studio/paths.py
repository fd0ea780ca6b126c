"""Every path the page sends is read against the studio's root: relative to it, or absolute inside it; `..` parts,
absolute paths elsewhere and symlinks that lead out are refused."""

from pathlib import Path


class PathRefused(ValueError):
    """A path outside the studio's root (the message names the field and the root)."""


def inside_root(root: Path, text, what: str = "path") -> Path:
    """The resolved path of `text` (relative to `root`, or absolute), if it lies under `root`."""
    if not isinstance(text, str) or not text.strip():
        raise PathRefused(f"{what}: expected a path under the studio's root {root}")
    if "\x00" in text:
        raise PathRefused(f"{what} {text!r}: a path cannot hold a NUL character")
    path = Path(text).expanduser()
    if ".." in path.parts:
        raise PathRefused(f"{what} {text!r}: '..' is not allowed; give a path under the studio's root {root}")
    root = Path(root).resolve()
    resolved = (path if path.is_absolute() else root / path).resolve()  # follows symlinks: one out is caught here
    if resolved != root and root not in resolved.parents:
        raise PathRefused(f"{what} {text!r}: outside the studio's root {root} (start the studio with --root to "
                          f"work elsewhere)")
    return resolved


def relative_to_root(root: Path, path: Path) -> str:
    """How the page names a path: relative to the root ('.' for the root itself)."""
    relative = Path(path).resolve().relative_to(Path(root).resolve())
    return str(relative) if str(relative) != "." else "."
