"""Where tunedesk keeps its things. Everything lives under one workspace root.

The root is `$TUNEDESK_HOME` when set, else the current directory, so a checkout is a
self-contained workspace: `models/`, `data/`, `runs/`.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("TUNEDESK_HOME", ".")).resolve()


def models_dir() -> Path:
    return home() / "models"


def data_dir() -> Path:
    return home() / "data"


def runs_dir() -> Path:
    return home() / "runs"


def tiny_base_dir() -> Path:
    """The embedded default base model, built by `tunedesk base build`."""
    return models_dir() / "tiny-base"
