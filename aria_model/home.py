"""The data home: where every step's outputs live (``$ARIA_HOME``, default ``./.aria``)."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV_VAR = "ARIA_HOME"
DEFAULT_HOME = ".aria"


def default_home() -> Path:
    """$ARIA_HOME, else ``.aria`` in the working directory, always absolute."""
    return Path(os.environ.get(HOME_ENV_VAR) or DEFAULT_HOME).expanduser().resolve()
