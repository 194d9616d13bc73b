"""Aria's absolute-onset tokenizer (``AbsTokenizer``), vectorised over note arrays.

Same tokens and ids as Aria's released tokenizer (vocab 17,727), so weights
trained on either side load on the other::

    [prefix tokens] <S> body <E>
    body: per note  <T>*k (inst, pitch, vel) (onset, ms) (dur, ms)   or   <T>*k (drum, note) (onset, ms)

``<T>`` marks each 5 s segment crossed (from unquantised ms); onsets are on a
10 ms grid within the segment (0..4990), durations 10..5000 ms, velocities on a
10-step grid (never 0 for a sounding note). What this shares with
``RelTokenizer`` (vocabulary, note ids, quantisation, prefixes, ``<D>``,
decoding to a Performance) lives in ``aria_model.note_tokenizer``; this module
holds only the onset tokens: how the body is written and read back.

    tok = AbsTokenizer()
    ids = tok.tokenize_ids(perf)          # uint16, == tok.encode(tok.tokenize(perf))
    perf_back = tok.detokenize_ids(ids)   # 1 tick = 1 ms
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np

from aria_model.midi import Performance
from aria_model.note_tokenizer import (
    SPECIAL_TOKENS,
    TIME,
    NoteTokenizer,
    NoteTokenizerConfig,
    VocabLayout,
    grid_index_table,
)

@dataclass(frozen=True)
class AbsTokenizerConfig(NoteTokenizerConfig):
    """Aria's ``tokenizer.abs`` settings; the defaults are the released model's."""

    segment_ms: int = 5000  # one <T> per segment; onsets are relative to it
    max_dur_ms: int = 5000  # longer notes are clipped
    include_drums: bool = True


@dataclass(frozen=True)
class AbsLayout(VocabLayout):
    """``VocabLayout`` plus the offset of the onset tokens."""

    onset: int
    size: int


class AbsTokenizer(NoteTokenizer):
    """Tokenize Performances into Aria ids and back. See the module docstring."""

    name = "abs"
    special_tokens = SPECIAL_TOKENS
    time_family = "onset"
    layout_type = AbsLayout

    def __init__(self, config: AbsTokenizerConfig | None = None):
        c = config or AbsTokenizerConfig()
        super().__init__(c, time_values=list(range(0, c.segment_ms, c.time_step_ms)))
        self.time_id = TIME

    @cached_property
    def onset_grid_index(self) -> np.ndarray:
        """Grid index of every in-segment ms value 0..segment_ms-1 (4995..4999 snap to 4990)."""
        return grid_index_table(self.time_values, self.config.segment_ms)

    def _body_ids(self, perf: Performance, remove_preceding_silence: bool) -> np.ndarray:
        c, lay = self.config, self.layout
        onset = perf.onset_ms(remove_preceding_silence)
        segment = onset // c.segment_ms
        n_time = np.maximum(segment - np.concatenate(([0], segment[:-1])), 0)
        is_drum, note_ids, dur_ids = self._note_ids(perf)
        note_len = np.where(is_drum, 2 if c.include_drums else 0, 3)
        ends = np.cumsum(n_time + note_len)
        at = ends - note_len  # position of each note's first token
        body = np.full(int(ends[-1]), TIME, dtype=np.int64)

        onset_ids = lay.onset + self.onset_grid_index[onset % c.segment_ms]
        written = ~is_drum | c.include_drums
        body[at[written]] = note_ids[written]
        body[at[written] + 1] = onset_ids[written]
        played = ~is_drum
        body[at[played] + 2] = dur_ids[played]
        return body

    def _completes_note(self, token_id: int) -> bool:
        return token_id >= self.layout.dur  # (dur) and (onset) follow their note

    def _read_body(self, ids: np.ndarray, body_start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Aria's windows: (note, onset, dur) or (drum, onset), onsets offset by the ``<T>`` before them."""
        c, lay = self.config, self.layout
        segment_start = c.segment_ms * np.concatenate(([0], np.cumsum(ids == TIME)[:-1]))
        at = np.arange(body_start, max(len(ids) - 2, body_start))
        first, second, third = ids[at], ids[at + 1], ids[at + 2]
        has_onset = second >= lay.onset
        is_note = (first >= lay.note) & (first < lay.drum) & has_onset & (third >= lay.dur) & (third < lay.onset)
        is_drum = (first >= lay.drum) & (first < lay.dur) & has_onset
        found = is_note | is_drum
        onset_ms = segment_start[at[found]] + (second[found] - lay.onset) * c.time_step_ms
        return first[found], third[found], onset_ms

    def export_data_aug(self) -> list[Callable[[np.ndarray, np.random.Generator], np.ndarray]]:
        """Aria's training augmentations in Aria's order: tempo, pitch, velocity."""
        from aria_model.augmentation import export_data_aug

        return export_data_aug(self)
