"""Aria's relative-time tokenizer (``RelTokenizer``), vectorised, for the tokenizer ablation.

MuseNet-like: time passes only through wait tokens between consecutive notes::

    [prefix tokens] <S> body <E>
    body: notes in start order, each  (inst, pitch, vel) (dur, ms)  or  (drum, note),
          followed by the (wait, ms) tokens up to the next note's start

It follows ariautils' ``tokenizer/relative.py`` (Aria's RelTokenizer, not used
by the released model):

- the wait before a note is the time from the previous note's start, measured
  as Aria measures a duration (tempo walk from the previous note's own start);
  with ``remove_preceding_silence=False`` the first note waits from tick 0.
  Aria's tempo walk goes wrong after the last of several tempo changes (see
  ``aria_model.tempo``): there waits drift and can turn negative, which snaps
  them to 0. This is reproduced, as AbsTokenizer reproduces it in durations;
- a wait over 5000 ms emits ``(wait, 5000)`` until at most 5000 ms remain; the
  rest is snapped to the 10 ms grid and emitted unless it snaps to 0, so
  rounding errors accumulate along the piece (unlike AbsTokenizer's onsets);
- durations snap to the same 0..5000 ms grid, 0 becoming 10 ms; velocities,
  instruments, drums (always on; GM 35..81, others become ``<U>``), prefix
  tokens and the ``<D>`` position are as in AbsTokenizer, except that ``<D>``
  only steps back over a duration token (Aria's rule for this layout);
- the vocabulary is Aria's five special tokens (no ``<T>``), the prefixes,
  notes, drums, durations 0..5000 and waits 0..5000: 17,727 ids (the same
  size as AbsTokenizer's, by coincidence).

Deliberate differences from the reference:

- durations come from the Performance, whose sustain pedal folding is
  AbsTokenizer's (an end strictly inside a pedal interval moves to its
  release). Aria's RelTokenizer instead extends a note only when it *starts*
  inside the interval (and ends before the release); a Performance no longer holds the unpedalled ends needed
  for that, and one pedal rule for both tokenizers keeps the ablation about time;
- genre prefixes are jazz/classical; Aria's rel config lists the form names
  there by mistake. ``RelTokenizerConfig(genres=AbsTokenizerConfig.forms)``
  reproduces its ids (17,733);
- decoding drops a drum hit when there is no drum prefix (Aria raises KeyError).

    tok = RelTokenizer()
    ids = tok.tokenize_ids(perf)          # uint16, == tok.encode(tok.tokenize(perf))
    perf_back = tok.detokenize_ids(ids)   # 1 tick = 1 ms
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np

from aria_model.midi import DRUM, DRUM_CHANNEL, INSTRUMENTS, Performance
from aria_model.tempo import elapsed_ms
from aria_model.tokenizer import (
    NOTE_INSTRUMENTS,
    SPECIAL_TOKENS,
    TIME,
    UNK,
    AbsTokenizer,
    AbsTokenizerConfig,
    Token,
    closest_on_grid,
)

log = logging.getLogger(__name__)

REL_SPECIAL_TOKENS = SPECIAL_TOKENS[:TIME]  # <S> <E> <P> <U> <D>: same ids, no <T>
DRUM_NOTES = range(35, 82)  # the GM kit that has drum tokens


@dataclass(frozen=True)
class RelTokenizerConfig:
    """Aria's ``tokenizer.rel`` settings, genres corrected (see the module docstring)."""

    max_time_ms: int = 5000  # longest wait or duration token; longer waits repeat it
    time_step_ms: int = 10  # wait and duration grid
    velocity_step: int = 10
    drum_velocity: int = 60  # decoded drum hits have this velocity and last one time step
    dim_min_body: int = 150  # <D> only in bodies longer than this
    dim_offset: int = 100  # <D> about this many tokens before the end
    dim_jitter: int = 10
    composers: tuple[str, ...] = AbsTokenizerConfig.composers
    forms: tuple[str, ...] = AbsTokenizerConfig.forms
    genres: tuple[str, ...] = AbsTokenizerConfig.genres

    def config_hash(self) -> str:
        """Identity of the token set and its ids; never equal to an AbsTokenizer config's."""
        payload = {"tokenizer": "rel", **asdict(self)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _RelLayout:
    """Id offsets of each token family, in Aria's vocabulary order."""

    prefix: int
    note: int
    drum: int
    dur: int
    wait: int
    size: int


class RelTokenizer(AbsTokenizer):
    """Tokenize Performances into relative-time ids and back. See the module docstring.

    Shares AbsTokenizer's vocabulary mechanics (``encode``/``decode``, prefix
    tokens, velocity grid, ``<D>`` insertion, header decoding, ``tokenize``);
    replaces the body layout, the vocabulary and decoding.
    """

    name = "rel"

    def __init__(self, config: RelTokenizerConfig | None = None):
        self.config = config or RelTokenizerConfig()
        c = self.config
        self.instruments_wd = INSTRUMENTS  # Aria's RelTokenizer always keeps drums
        self.velocities = list(range(0, 128, c.velocity_step))[: 127 // c.velocity_step + 1]
        self.times = list(range(0, c.max_time_ms + 1, c.time_step_ms))  # wait and duration values
        self.prefix_tokens = (
            [("prefix", "instrument", i) for i in self.instruments_wd]
            + [("prefix", "composer", x) for x in c.composers]
            + [("prefix", "form", x) for x in c.forms]
            + [("prefix", "genre", x) for x in c.genres]
        )
        prefix = len(REL_SPECIAL_TOKENS)
        note = prefix + len(self.prefix_tokens)
        drum = note + len(NOTE_INSTRUMENTS) * 128 * len(self.velocities)
        dur = drum + len(DRUM_NOTES)
        wait = dur + len(self.times)
        self.layout = _RelLayout(prefix, note, drum, dur, wait, wait + len(self.times))
        self.bos_id, self.eos_id, self.pad_id, self.unk_id, self.dim_id = range(len(REL_SPECIAL_TOKENS))

    @cached_property
    def vocab(self) -> list[Token]:
        notes = [(i, p, v) for i in NOTE_INSTRUMENTS for p in range(128) for v in self.velocities]
        return (
            list(REL_SPECIAL_TOKENS)
            + self.prefix_tokens
            + notes
            + [("drum", p) for p in DRUM_NOTES]
            + [("dur", t) for t in self.times]
            + [("wait", t) for t in self.times]
        )

    @cached_property
    def _time_step(self) -> np.ndarray:
        """Grid index of every ms value 0..max_time_ms, snapped by Aria's binary search."""
        c = self.config
        return np.array([closest_on_grid(v, self.times) // c.time_step_ms for v in range(c.max_time_ms + 1)])

    # -- tokenize -----------------------------------------------------------
    def _body_ids(self, perf: Performance, remove_preceding_silence: bool) -> np.ndarray:
        """Per note: its waits, then its note (and duration) or drum token."""
        c, lay = self.config, self.layout
        if perf.n_notes == 0:
            raise ValueError("performance has no notes")
        n_full, rest_step = self._split_waits(self._waits_ms(perf, remove_preceding_silence))
        is_drum = perf.channel == DRUM_CHANNEL
        event_len = np.where(is_drum, 1, 2)
        block_len = n_full + (rest_step > 0) + event_len
        at = np.cumsum(block_len) - event_len  # position of each note's own token
        # Prefilled with the longest wait, so only each block's last wait is written.
        body = np.full(int(at[-1] + event_len[-1]), lay.wait + c.max_time_ms // c.time_step_ms, dtype=np.int64)
        has_rest = rest_step > 0
        body[at[has_rest] - 1] = lay.wait + rest_step[has_rest]

        played = ~is_drum
        body[at[played]] = (
            lay.note
            + perf.instrument[played].astype(np.int64) * 128 * len(self.velocities)
            + perf.pitch[played].astype(np.int64) * len(self.velocities)
            + self._velocity_step[perf.velocity[played]]
        )
        duration = np.clip(perf.duration_ms()[played], 0, c.max_time_ms)
        body[at[played] + 1] = lay.dur + np.maximum(self._time_step[duration], 1)
        pitch = perf.pitch[is_drum].astype(np.int64)
        in_kit = (pitch >= DRUM_NOTES.start) & (pitch < DRUM_NOTES.stop)
        body[at[is_drum]] = np.where(in_kit, lay.drum + pitch - DRUM_NOTES.start, UNK)
        return body

    def _waits_ms(self, perf: Performance, remove_preceding_silence: bool) -> np.ndarray:
        """Ms to wait before each note: from the previous note's start (first: 0 or from tick 0)."""
        args = (perf.tempo_tick, perf.tempo_us, perf.ticks_per_beat)
        lead = np.zeros(1, np.int64) if remove_preceding_silence else elapsed_ms(0, perf.start_tick[:1], *args)
        return np.concatenate([lead, elapsed_ms(perf.start_tick[:-1], perf.start_tick[1:], *args)])

    def _split_waits(self, wait_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Aria's wait tokens: how many full-length waits, and the grid step of the rest (0: none)."""
        c = self.config
        n_full = np.maximum(wait_ms - 1, 0) // c.max_time_ms  # Aria subtracts while more than the max remains
        rest = np.clip(wait_ms - n_full * c.max_time_ms, 0, c.max_time_ms)
        return n_full, self._time_step[rest]

    def _dim_position(self, body: np.ndarray, rng: np.random.Generator | None) -> int:
        c, lay = self.config, self.layout
        jitter = int(rng.integers(-c.dim_jitter, c.dim_jitter + 1)) if rng is not None else 0
        pos = len(body) - c.dim_offset + jitter
        on_duration = lay.dur <= body[pos] < lay.wait
        return pos - 1 if on_duration else pos  # never between a note and its duration

    # -- detokenize ---------------------------------------------------------
    def detokenize_ids(self, ids) -> Performance:
        """Aria's decoding: a clock advanced by waits; (note, dur) pairs and drum tokens sound at it."""
        ids = np.asarray(ids, dtype=np.int64)
        c, lay = self.config, self.layout
        body_start, channel_of = self._read_header(ids)
        body = ids[body_start:]
        wait_ms = np.where(body >= lay.wait, (body - lay.wait) * c.time_step_ms, 0)
        clock = np.cumsum(wait_ms) - wait_ms
        # Aria reads (token, next token) pairs, so the very last token never sounds.
        first, second = body[:-1], body[1:]
        is_note = (first >= lay.note) & (first < lay.drum) & (second >= lay.dur) & (second < lay.wait)
        is_drum = (first >= lay.drum) & (first < lay.dur)
        n_vel = len(self.velocities)
        instrument = np.where(is_drum, DRUM, (first - lay.note) // (128 * n_vel))
        keep = (is_note | is_drum) & np.isin(instrument, list(channel_of))
        if ((is_note | is_drum) & ~keep).any():
            log.warning("dropped notes whose instrument has no prefix token")
        pos = np.flatnonzero(keep)
        drum = is_drum[pos]
        offset = first[pos] - lay.note
        inst = instrument[pos]
        channel_lut = np.array([channel_of.get(i, 0) for i in range(len(INSTRUMENTS))])
        return Performance.from_ms(
            onset_ms=clock[pos],
            duration_ms=np.where(drum, c.time_step_ms, (second[pos] - lay.dur) * c.time_step_ms),
            pitch=np.where(drum, first[pos] - lay.drum + DRUM_NOTES.start, offset // n_vel % 128),
            velocity=np.where(drum, c.drum_velocity, offset % n_vel * c.velocity_step),
            instrument=inst,
            channel=channel_lut[inst],
            instruments=tuple(INSTRUMENTS[i] for i in sorted(channel_of)),
        )

    def export_data_aug(self):
        """Aria's RelTokenizer augmentations (chord mixup, wait rescaling) are not ported."""
        raise NotImplementedError("aria_model.augmentation handles AbsTokenizer ids only")
