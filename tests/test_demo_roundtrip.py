"""Demo corpus through the tokenizer: piano only, and detokenize(tokenize(x)) == x up to quantisation."""

import numpy as np
import pytest

from aria_model.midi import INSTRUMENTS, load_midi
from aria_model.tokenizer import AbsTokenizer


def quantised(perf, tokenizer):
    """(onset, duration, pitch, velocity) per note on the tokenizer's grids, sorted."""
    onset = perf.onset_ms()
    segment, within = np.divmod(onset, tokenizer.config.segment_ms)
    onset_q = segment * tokenizer.config.segment_ms + tokenizer.onset_grid_index[within] * tokenizer.config.time_step_ms
    duration_q = tokenizer.duration_grid_index[np.clip(perf.duration_ms(), 0, tokenizer.config.max_dur_ms)] * 10
    velocity_q = tokenizer.velocity_grid_index[perf.velocity] * tokenizer.config.velocity_step
    return sorted(zip(onset_q.tolist(), duration_q.tolist(), perf.pitch.tolist(), velocity_q.tolist()))


def check_round_trip(folder):
    tokenizer = AbsTokenizer()
    files = sorted(folder.rglob("*.mid"))
    assert files
    for path in files:
        perf = load_midi(path)
        tokens = tokenizer.tokenize(perf)
        note_instruments = {t[0] for t in tokens if isinstance(t, tuple) and t[0] in INSTRUMENTS}
        assert note_instruments == {"piano"}, f"{path.name}: {note_instruments}"
        assert [t for t in tokens if t[0] == "prefix"] == [("prefix", "instrument", "piano")]
        decoded = tokenizer.detokenize(tokens)
        assert quantised(decoded, tokenizer) == quantised(perf, tokenizer), path.name


def test_tiny_demo_corpus_round_trips(tiny_demo_corpus):
    check_round_trip(tiny_demo_corpus)


@pytest.mark.slow
def test_default_demo_corpus_round_trips(demo_corpus_dir):
    check_round_trip(demo_corpus_dir)
