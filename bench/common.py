"""What the benchmarks share: Aria-MIDI's size, and a scratch folder that goes away unless ``--keep`` asks otherwise."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

# Aria-MIDI "full" (reference/aria.md §10): the corpus the curation and scale goals are about.
ARIA_MIDI_FILES = 1_186_253
ARIA_MIDI_NOTES = 2.0e9  # ~1,700 notes a file


def run_in_scratch(args: argparse.Namespace, run: Callable[[argparse.Namespace, Path], None], prefix: str) -> None:
    """``run(args, work)`` in a fresh temporary folder, removed afterwards unless ``args.keep``."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        run(args, work)
    finally:
        if args.keep:
            print(f"\nkept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
