"""Where ghil's own files live, found through the installed package (editable or not), never the working directory.

``CONFIG_DIR`` holds the Hydra configs (``ghil/configs/<command>.yaml`` and one group per stage) and
``CHECKPOINT_DIR`` the shipped checkpoints (``ghil/checkpoints/<name>/``), so every command works from any folder.

Usage::

    resolve_checkpoint("checkpoints/dit_small")   # ./checkpoints/dit_small if it exists, else the shipped one
"""

from __future__ import annotations

import os
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
