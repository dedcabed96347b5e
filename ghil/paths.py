"""Where ghil's own files live, found through the installed package (editable or not), never the working directory.

``CONFIG_DIR`` holds the Hydra configs (``ghil/configs/<command>.yaml`` and one group per stage) and
``CHECKPOINT_DIR`` the shipped checkpoints (``ghil/checkpoints/<name>/``), so every command works from any folder.

``source_checkout()`` is the repository when ghil runs from one (editable install, PYTHONPATH), None for an
installed wheel, and ``git_state()`` the commit of that checkout: an installed copy never reports the commit of an
unrelated repository that happens to contain its virtual environment.

Usage::

    resolve_checkpoint("checkpoints/dit_small")   # ./checkpoints/dit_small if it exists, else the shipped one
    git_state()                                   # {"commit": "<sha>" | "unknown", "dirty": bool | None}
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_ROOT / "configs"
CHECKPOINT_DIR = PACKAGE_ROOT / "checkpoints"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder: absolute paths as given; a relative path in the working directory first, then inside
    the installed package (where ``checkpoints/<name>`` names a shipped checkpoint). FileNotFoundError naming every
    place tried otherwise."""
    given = Path(path).expanduser()
    if given.is_absolute():
        candidates = [given]
    else:
        candidates = [Path.cwd() / given, PACKAGE_ROOT / given]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    shipped = sorted(p.name for p in CHECKPOINT_DIR.iterdir() if p.is_dir()) if CHECKPOINT_DIR.is_dir() else []
    raise FileNotFoundError(f"checkpoint folder {str(path)!r} not found (tried {tried}); shipped checkpoints: "
                            f"{', '.join(f'checkpoints/{n}' for n in shipped) or 'none'}")


def source_checkout() -> Path | None:
    """The repository root when the ``ghil`` package is imported from its source tree (a ``pyproject.toml`` naming
    the ghil project beside it); None for an installed (non-editable) copy."""
    root = PACKAGE_ROOT.parent
    try:
        pyproject = (root / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    return root if 'name = "ghil"' in pyproject else None


def git_state() -> dict:
    """``{"commit": sha, "dirty": bool}`` of the source checkout (tracked files only), or ``{"commit": "unknown",
    "dirty": None}`` for an installed copy, without git, or outside a work tree. Never raises."""
    root = source_checkout()
    if root is None:
        return {"commit": "unknown", "dirty": None}
    try:
        # --no-optional-locks: `git status` must not take the checkout's .git/index.lock (a user's concurrent git
        # commands would fail) to refresh the index
        commit = subprocess.run(["git", "--no-optional-locks", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return {"commit": commit, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
