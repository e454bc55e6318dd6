"""Where local state lives: ``$DEEPINDEX_HOME`` or ``./.deepindex`` (ignored by git)."""
from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    d = Path(os.environ.get("DEEPINDEX_HOME") or Path.cwd() / ".deepindex").expanduser().resolve()
    d.mkdir(parents=True, exist_ok=True)
    return d
