"""A relative-time tokenizer (``RelTokenizer``) for the paper's tokenizer ablation.

MuseNet-like: time passes only through wait tokens between consecutive notes::

    [prefix tokens] <S> body <E>
    body: notes in start order, each  (inst, pitch, vel) (dur, ms)  or  (drum, note),
          followed by the (wait, ms) tokens up to the next note's start

The ablation compares absolute and relative time with the same model on the
same data, so this tokenizer sees exactly the notes ``AbsTokenizer`` sees, and
differs only in how time is written. Everything but the time tokens (note ids,
durations, velocities, prefixes, ``<D>``, decoding) is ``NoteTokenizer``'s, in
``aria_model.note_tokenizer``.

What is Aria's (ariautils' ``tokenizer/relative.py``, not used by the released
model):

- the token scheme above and its vocabulary: Aria's five special tokens (no
  ``<T>``), the prefixes, notes, drums (always on; GM 35..81, others become
  ``<U>``), durations 0..5000 and waits 0..5000 ms: 17,727 ids (the same size
  as AbsTokenizer's, by coincidence);
- a wait over 5000 ms emits ``(wait, 5000)`` until at most 5000 ms remain; the
  rest is snapped to the 10 ms grid and emitted unless it snaps to 0. Snapping
  errors (up to 5 ms per gap) therefore accumulate along the piece, unlike
  AbsTokenizer's onsets: that drift is the relative scheme's real property and
  part of what the ablation measures;
- ``<D>`` steps back only over a duration token (Aria's rule for this layout).

What deliberately differs, and why:

- waits are the differences of consecutive ``perf.onset_ms(...)``: the onsets
  AbsTokenizer writes, measured from the first note (or from tick 0 with
  ``remove_preceding_silence=False``, when the first note waits for its onset).
  Aria instead measures each wait by walking the tempo map from the previous
  note's start, which has two effects an ablation must not measure: each gap
  is rounded to whole ms on its own (a 1 ms difference per gap wherever a tick
  is not a whole number of ms), and after the last of several tempo changes
  its walk starts from the wrong tempo message (see ``aria_model.tempo``), so
  waits drift or turn negative (POP909_010 loses 95 s). Where every gap is a
  whole number of ms and no gap follows a tempo change, the ids are Aria's;
- durations come from the Performance, whose sustain pedal folding is
  AbsTokenizer's (an end strictly inside a pedal interval moves to its
  release). Aria's RelTokenizer instead extends a note only when it *starts*
  inside the interval (and ends before the release); one pedal rule for both
  tokenizers keeps the ablation about time;
- genre prefixes are jazz/classical; Aria's rel config lists the form names
  there by mistake. ``RelTokenizerConfig(genres=RelTokenizerConfig.forms)``
  reproduces its ids (17,733);
- decoding drops a drum hit when there is no drum prefix (Aria raises KeyError);
- no training augmentations: Aria's rel ones (chord mixup, wait rescaling) are
  not ported, and ``aria_model.augmentation`` reads AbsTokenizer ids only.

    tok = RelTokenizer()
    ids = tok.tokenize_ids(perf)          # uint16, == tok.encode(tok.tokenize(perf))
    perf_back = tok.detokenize_ids(ids)   # 1 tick = 1 ms
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

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
class RelTokenizerConfig(NoteTokenizerConfig):
    """Aria's ``tokenizer.rel`` settings, genres corrected (see the module docstring)."""

    max_time_ms: int = 5000  # longest wait or duration token; longer waits repeat it
    include_drums: ClassVar[bool] = True  # Aria's RelTokenizer always keeps drums
    tokenizer_tag: ClassVar[str | None] = "rel"

    @property
    def max_dur_ms(self) -> int:
        return self.max_time_ms  # durations and waits share one grid


@dataclass(frozen=True)
class RelLayout(VocabLayout):
    """``VocabLayout`` plus the offset of the wait tokens."""

    wait: int
    size: int


class RelTokenizer(NoteTokenizer):
    """Tokenize Performances into relative-time ids and back. See the module docstring."""

    name = "rel"
    special_tokens = SPECIAL_TOKENS[:TIME]  # <S> <E> <P> <U> <D>: AbsTokenizer's ids, no <T>
    time_family = "wait"
    layout_type = RelLayout

    def __init__(self, config: RelTokenizerConfig | None = None):
        c = config or RelTokenizerConfig()
        super().__init__(c, time_values=list(range(0, c.max_time_ms + 1, c.time_step_ms)))

    @cached_property
    def wait_grid_index(self) -> np.ndarray:
        """Grid index of every wait 0..max_time_ms (unlike a duration, a wait may snap to 0)."""
        return grid_index_table(self.time_values, self.config.max_time_ms + 1)

    def _body_ids(self, perf: Performance, remove_preceding_silence: bool) -> np.ndarray:
        """Per note: the waits since the previous note's onset, then its note (and duration) or drum token."""
        c, lay = self.config, self.layout
        wait_ms = np.diff(perf.onset_ms(remove_preceding_silence), prepend=0)
        n_full = np.maximum(wait_ms - 1, 0) // c.max_time_ms  # Aria subtracts while more than the max remains
        rest_step = self.wait_grid_index[np.clip(wait_ms - n_full * c.max_time_ms, 0, c.max_time_ms)]
        has_rest = rest_step > 0
        is_drum, note_ids, dur_ids = self._note_ids(perf)
        note_len = np.where(is_drum, 1, 2)
        at = np.cumsum(n_full + has_rest + note_len) - note_len  # position of each note's own token
        # Prefilled with the longest wait, so only each note's last wait is written.
        body = np.full(int(at[-1] + note_len[-1]), self.tok_to_id["wait", c.max_time_ms], dtype=np.int64)
        body[at[has_rest] - 1] = lay.wait + rest_step[has_rest]
        body[at] = note_ids
        played = ~is_drum
        body[at[played] + 1] = dur_ids[played]
        return body

    def _completes_note(self, token_id: int) -> bool:
        return self.layout.dur <= token_id < self.layout.wait  # only (dur) belongs to the note before it

    def _read_body(self, ids: np.ndarray, body_start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Aria's decoding: a clock advanced by waits; (note, dur) pairs and drum tokens sound at it."""
        c, lay = self.config, self.layout
        body = ids[body_start:]
        wait_ms = np.where(body >= lay.wait, (body - lay.wait) * c.time_step_ms, 0)
        clock = np.cumsum(wait_ms) - wait_ms
        # Aria reads (token, next token) pairs, so the very last token never sounds.
        first, second = body[:-1], body[1:]
        is_note = (first >= lay.note) & (first < lay.drum) & (second >= lay.dur) & (second < lay.wait)
        is_drum = (first >= lay.drum) & (first < lay.dur)
        found = np.flatnonzero(is_note | is_drum)
        return first[found], second[found], clock[found]
