"""Shared fixtures: the golden MIDI files and a source folder mixing good and bad files."""

import shutil
from pathlib import Path

import mido
import pytest
import torch

from tests.midi_builders import midi_bytes, notes_file

GOLDEN_DIR = Path(__file__).parent / "fixtures" / "golden"
GOLDEN_MIDI = sorted((GOLDEN_DIR / "midi").glob("*.mid"))

# One file per quarantine reason the ingest must tell apart.
BAD_FILES = {
    "empty.mid": (b"", "empty_file"),
    "not_midi.mid": (b"ID3\x03\x00\x00\x00\x00\x00\x00 an mp3, not MIDI", "not_midi"),
    "truncated.mid": (notes_file([(60, 0, 100), (62, 100, 200), (64, 200, 300)])[:40], "truncated"),
    "no_notes.mid": (midi_bytes([[mido.MetaMessage("set_tempo", tempo=500_000, time=0)]]), "no_notes"),
}
GOOD_GOLDEN = ["basic.mid", "bwv66.6.mxl.mid", "miditok1_POP909_008.mid"]


@pytest.fixture(autouse=True, scope="session")
def _data_home_outside_the_checkout(tmp_path_factory):
    """Anything that falls back to the default data home (an MLflow store, model folders) writes
    to a temporary one, never to ./.aria of the working tree."""
    patch = pytest.MonkeyPatch()
    patch.setenv("ARIA_HOME", str(tmp_path_factory.mktemp("aria_home")))
    patch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    patch.undo()


@pytest.fixture
def mixed_source(tmp_path) -> Path:
    """A plain source folder: three real MIDI files and one bad file per quarantine reason."""
    source = tmp_path / "source"
    (source / "bad").mkdir(parents=True)
    for name in GOOD_GOLDEN:
        shutil.copy(GOLDEN_DIR / "midi" / name, source / name)
    for name, (data, _) in BAD_FILES.items():
        (source / "bad" / name).write_bytes(data)
    return source


def _built_demo_corpus(tmp_path_factory, preset: str) -> Path:
    from aria_model.demo_corpus import DemoCorpusConfig, build_demo_corpus

    out = tmp_path_factory.mktemp(f"demo_{preset}")
    report = build_demo_corpus(out, DemoCorpusConfig.preset(preset))
    assert report.failed == 0, report.failures
    return out


@pytest.fixture(scope="session")
def tiny_demo_corpus(tmp_path_factory) -> Path:
    """The tiny demo preset (a few real pieces per collection), built once per test session."""
    return _built_demo_corpus(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def demo_corpus_dir(tmp_path_factory) -> Path:
    """The default demo corpus the README's main command uses (slow to build: minutes)."""
    return _built_demo_corpus(tmp_path_factory, "demo")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny training steps: on shared CI cores, OpenMP's
    spinning threads make them tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
