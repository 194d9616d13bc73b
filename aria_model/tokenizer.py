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

from aria_model import abs_kernels
from aria_model.midi import DRUM_CHANNEL, Performance
from aria_model.note_tokenizer import (
    BOS,
    DIM,
    DRUM_NOTES,
    EOS,
    SPECIAL_TOKENS,
    TIME,
    UNK,
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
        body, _ = self._bodies(perf.onset_ms(remove_preceding_silence), perf.duration_ms(), perf.pitch,
                               perf.velocity, perf.instrument, perf.channel, np.array([0, perf.n_notes]))
        return body

    def _bodies(self, onset, duration_ms, pitch, velocity, instrument, channel, offsets) -> tuple[np.ndarray, np.ndarray]:
        """The bodies of several performances end to end, and their offsets. Performance i's notes are
        ``[offsets[i], offsets[i + 1])`` of each array; its segments count from its own first onset."""
        return abs_kernels.bodies(onset, duration_ms, pitch, velocity, instrument, channel,
                                  np.asarray(offsets, np.int64), self.kernel_layout)

    @cached_property
    def kernel_layout(self) -> abs_kernels.Layout:
        c, lay = self.config, self.layout
        return abs_kernels.Layout(
            segment_ms=c.segment_ms, include_drums=c.include_drums, drum_channel=DRUM_CHANNEL, time_id=TIME,
            note=lay.note, n_velocities=len(self.velocities), velocity_index=self.velocity_grid_index,
            drum=lay.drum, drum_first=DRUM_NOTES.start, drum_stop=DRUM_NOTES.stop, unk=UNK, dur=lay.dur,
            duration_index=self.duration_grid_index, max_dur_ms=c.max_dur_ms, onset=lay.onset,
            onset_index=self.onset_grid_index,
        )

    def tokenize_ids_many(self, onset_ms, duration_ms, pitch, velocity, instrument, channel, offsets,
                          prefixes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``tokenize_ids(perf)`` (its defaults, no rng) of several performances at once: their ids
        end to end (uint16) and offsets. Bulk tokenizing goes through here: one compiled pass over
        the notes, where a call per file costs more in numpy's per-call overhead than in its notes.

        Performance i's notes are ``[offsets[i], offsets[i + 1])`` of each array, ``onset_ms`` as
        ``perf.onset_ms()`` (from its first note), ``duration_ms`` as ``perf.duration_ms()``, and its
        prefix is ``prefixes[i]`` (``prefix_ids``). Every performance needs a note.
        """
        body, starts = self._bodies(onset_ms, duration_ms, pitch, velocity, instrument, channel, offsets)
        prefix_offsets = np.concatenate(([0], np.cumsum([len(p) for p in prefixes]))).astype(np.int64)
        prefix = np.concatenate(prefixes).astype(np.int64) if prefixes else np.zeros(0, np.int64)
        c = self.config
        return abs_kernels.assemble(body, starts, prefix, prefix_offsets, c.dim_min_body, c.dim_offset,
                                    self.layout.dur, BOS, DIM, EOS)

    def _completes_note(self, token_id: int) -> bool:
        return token_id >= self.layout.dur  # (dur) and (onset) follow their note (abs_kernels.assemble too)

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

