"""What the benchmarks share: a scratch folder that goes away unless ``--keep`` asks otherwise."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


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
