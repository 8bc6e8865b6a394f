"""Names and paths read from data files (a manifest, a run record) never reach outside the folder that holds them.

A manifest or run.json may come from anyone: a source named `../../x` or a shard path `/etc/passwd` must not make
mixlab read, write or delete outside the dataset. These checks say what is wrong with one value (None: fine), so that
each caller can raise its own error naming its file, entry and fix. One rule for both packages lives here.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath, PureWindowsPath

PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]+")
PLAIN_NAME_RULE = "letters, digits, '-', '_' and '.' only, not '.' or '..'"


def name_problem(name: object) -> str | None:
    """Why `name` cannot be a folder name of its own (a source, a run id), or None when it can."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not PLAIN_NAME.fullmatch(name) or name in (".", ".."):
        return f"is not a plain name ({PLAIN_NAME_RULE})"
    return None


def outside_problem(root: Path, path: Path) -> str | None:
    """Why `path` is not inside `root` once symlinks are resolved (a symlink pointing out), or None."""
    base = root.resolve()
    target = path.resolve()
    if target == base or target.is_relative_to(base):
        return None
    return f"resolves to {target}, outside {base} (a symlink pointing out of it?)"


def relative_path_problem(root: Path, relative: object) -> str | None:
    """Why `relative` is not a relative path that stays inside `root` (after resolving symlinks), or None."""
    if not isinstance(relative, str):
        return f"is a {type(relative).__name__}, not a string"
    if not relative or relative.strip() != relative or "\x00" in relative:
        return "is not a usable relative path"
    if PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).is_absolute() or relative.startswith("\\"):
        return "is an absolute path; it must be relative to its folder"
    if ".." in PurePosixPath(relative.replace("\\", "/")).parts:
        return "climbs out of its folder with '..'"
    return outside_problem(root, root / relative)
