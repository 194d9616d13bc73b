"""Resources shared by the assets: where outputs live and which MIDI source to read."""


import os
from pathlib import Path

import dagster as dg

from aria_model.sources import resolve_sources

HOME_ENV_VAR = "ARIA_HOME"
DEFAULT_HOME = ".aria"


def default_home() -> Path:
    """$ARIA_HOME, else ``.aria`` in the working directory, always absolute."""
    return Path(os.environ.get(HOME_ENV_VAR) or DEFAULT_HOME).expanduser().resolve()


class AriaHome(dg.ConfigurableResource):
    """The data home: every asset writes under ``<home>/<asset name>/``."""

    path: str | None = None  # None: $ARIA_HOME or ./.aria

    @property
    def root(self) -> Path:
        return Path(self.path).expanduser().resolve() if self.path else default_home()

    def asset_dir(self, asset_name: str) -> Path:
        folder = self.root / asset_name
        folder.mkdir(parents=True, exist_ok=True)
        return folder


class MidiSource(dg.ConfigurableResource):
    """The MIDI folders to ingest; unset means the embedded demo corpus."""

    path: str | None = None  # None: $ARIA_SOURCE; several folders separated like PATH; neither: demo corpus
    layout: str | None = None  # aria_midi | maestro | demo | plain; None: detect per folder

    @property
    def folders(self) -> list[Path]:
        return resolve_sources(self.path)
