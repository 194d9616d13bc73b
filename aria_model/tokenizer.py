"""Aria's absolute-onset tokenizer (``AbsTokenizer``), vectorised over note arrays.

Same tokens and ids as Aria's released tokenizer (vocab 17,727), so weights
trained on either side load on the other::

    [prefix tokens] <S> body <E>
    body: per note  <T>*k (inst, pitch, vel) (onset, ms) (dur, ms)   or   <T>*k (drum, note) (onset, ms)

``<T>`` marks each 5 s segment crossed (from unquantised ms); onsets are on a
10 ms grid within the segment (0..4990), durations 10..5000 ms, velocities on a
10-step grid (never 0 for a sounding note). Quantisation uses lookup tables
built with Aria's binary-search "closest" rule, so half-way ties resolve
exactly as the reference does (15 -> 20 but 25 -> 20).

Aria shuffles prefix tokens and jitters the ``<D>`` position at random; here
that happens only when an ``rng`` is passed. Without one the output is
deterministic: prefixes in vocabulary order and ``<D>`` exactly 100 tokens
before the end (the centre of Aria's jitter), moved to precede a note.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Callable

import numpy as np

from aria_model.midi import DRUM, DRUM_CHANNEL, INSTRUMENTS, Performance

log = logging.getLogger(__name__)

Token = str | tuple
SPECIAL_TOKENS = ("<S>", "<E>", "<P>", "<U>", "<D>", "<T>")
BOS, EOS, PAD, UNK, DIM, TIME = range(len(SPECIAL_TOKENS))
NOTE_INSTRUMENTS = INSTRUMENTS[:DRUM]
PROGRAM_OF_INSTRUMENT = {
    "piano": 0, "organ": 16, "guitar": 24, "bass": 32, "strings": 40,
    "ensemble": 48, "brass": 56, "reed": 64, "pipe": 73, "synth_lead": 80,
}


@dataclass(frozen=True)
class AbsTokenizerConfig:
    """Aria's ``tokenizer.abs`` settings; the defaults are the released model's."""

    segment_ms: int = 5000  # one <T> per segment; onsets are relative to it
    max_dur_ms: int = 5000  # longer notes are clipped
    time_step_ms: int = 10  # onset and duration grid
    velocity_step: int = 10
    include_drums: bool = True
    drum_velocity: int = 60  # decoded drum hits have this velocity and last one time step
    dim_min_body: int = 150  # <D> only in bodies longer than this
    dim_offset: int = 100  # <D> about this many tokens before the end
    dim_jitter: int = 10
    composers: tuple[str, ...] = (
        "bach", "beethoven", "mozart", "chopin", "rachmaninoff", "liszt",
        "debussy", "schubert", "brahms", "ravel", "satie", "scarlatti",
    )
    forms: tuple[str, ...] = ("sonata", "prelude", "nocturne", "étude", "waltz", "mazurka", "impromptu", "fugue")
    genres: tuple[str, ...] = ("jazz", "classical")

    def config_hash(self) -> str:
        """Identity of the token set and its ids, for shard manifests."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def closest_on_grid(value: int, grid: list[int]) -> int:
    """Aria's ``_find_closest_int``: binary search keeping the first strictly closer midpoint."""
    left, right = 0, len(grid) - 1
    closest = None
    while left <= right:
        mid = (left + right) // 2
        if closest is None or abs(grid[mid] - value) < abs(closest - value):
            closest = grid[mid]
        if grid[mid] < value:
            left = mid + 1
        else:
            right = mid - 1
    return closest


@dataclass(frozen=True)
class _Layout:
    """Id offsets of each token family, in Aria's vocabulary order."""

    prefix: int
    note: int
    drum: int
    dur: int
    onset: int
    size: int


class AbsTokenizer:
    """Tokenize Performances into Aria ids and back. See the module docstring."""

    name = "abs"

    def __init__(self, config: AbsTokenizerConfig | None = None):
        self.config = config or AbsTokenizerConfig()
        c = self.config
        self.instruments_wd = INSTRUMENTS if c.include_drums else NOTE_INSTRUMENTS
        self.velocities = list(range(0, 128, c.velocity_step))[: 127 // c.velocity_step + 1]
        self.durations = list(range(0, c.max_dur_ms + 1, c.time_step_ms))
        self.onsets = list(range(0, c.max_dur_ms, c.time_step_ms))
        self.prefix_tokens = (
            [("prefix", "instrument", i) for i in self.instruments_wd]
            + [("prefix", "composer", x) for x in c.composers]
            + [("prefix", "form", x) for x in c.forms]
            + [("prefix", "genre", x) for x in c.genres]
        )
        n_drums = 47 if c.include_drums else 0
        prefix = len(SPECIAL_TOKENS)
        note = prefix + len(self.prefix_tokens)
        drum = note + len(NOTE_INSTRUMENTS) * 128 * len(self.velocities)
        dur = drum + n_drums
        onset = dur + len(self.durations)
        self.layout = _Layout(prefix, note, drum, dur, onset, onset + len(self.onsets))
        self.bos_id, self.eos_id, self.pad_id, self.unk_id, self.dim_id, self.time_id = range(6)

    # -- vocabulary ---------------------------------------------------------
    @cached_property
    def vocab(self) -> list[Token]:
        notes = [(i, p, v) for i in NOTE_INSTRUMENTS for p in range(128) for v in self.velocities]
        drums = [("drum", p) for p in range(35, 82)] if self.config.include_drums else []
        return (
            list(SPECIAL_TOKENS)
            + self.prefix_tokens
            + notes
            + drums
            + [("dur", d) for d in self.durations]
            + [("onset", o) for o in self.onsets]
        )

    @cached_property
    def tok_to_id(self) -> dict[Token, int]:
        return {tok: i for i, tok in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        return self.layout.size

    def encode(self, tokens: list[Token]) -> list[int]:
        lookup = self.tok_to_id
        return [lookup.get(tok, UNK) for tok in tokens]

    def decode(self, ids) -> list[Token]:
        vocab = self.vocab
        return [vocab[i] if 0 <= i < len(vocab) else SPECIAL_TOKENS[UNK] for i in np.asarray(ids).tolist()]

    # -- quantisation tables ------------------------------------------------
    @cached_property
    def _onset_step(self) -> np.ndarray:
        """Grid index of every in-segment ms value 0..segment_ms-1."""
        c = self.config
        return np.array([closest_on_grid(v, self.onsets) // c.time_step_ms for v in range(c.segment_ms)], np.int64)

    @cached_property
    def _dur_step(self) -> np.ndarray:
        """Grid index of every duration 0..max_dur_ms (0 ms becomes one step)."""
        c = self.config
        steps = np.array([closest_on_grid(v, self.durations) // c.time_step_ms for v in range(c.max_dur_ms + 1)])
        return np.maximum(steps, 1).astype(np.int64)

    @cached_property
    def _velocity_step(self) -> np.ndarray:
        steps = np.array([closest_on_grid(v, self.velocities) // self.config.velocity_step for v in range(128)])
        steps[1:] = np.maximum(steps[1:], 1)  # a sounding note never gets velocity 0
        return steps.astype(np.int64)

    # -- tokenize -----------------------------------------------------------
    def tokenize_ids(
        self,
        perf: Performance,
        remove_preceding_silence: bool = True,
        add_dim_tok: bool = True,
        add_eos_tok: bool = True,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Ids (uint16) equal to ``encode(tokenize(perf, ...))``."""
        body = self._body_ids(perf, remove_preceding_silence)
        if add_dim_tok and len(body) > self.config.dim_min_body:
            body = np.insert(body, self._dim_position(body, rng), DIM)
        parts = [self._prefix_ids(perf, rng), np.array([BOS]), body]
        if add_eos_tok:
            parts.append(np.array([EOS]))
        return np.concatenate(parts).astype(np.uint16)

    def tokenize(self, perf: Performance, remove_preceding_silence: bool = True, add_dim_tok: bool = True,
                 add_eos_tok: bool = True, rng: np.random.Generator | None = None, **_: Any) -> list[Token]:
        """Aria-style tokens (tuples and strings) for a Performance."""
        ids = self.tokenize_ids(perf, remove_preceding_silence, add_dim_tok, add_eos_tok, rng)
        tokens = self.decode(ids)
        # Drum notes outside GM 35..81 have no id; Aria still emits their token.
        unknown = np.nonzero(ids == UNK)[0]
        if len(unknown):
            drums = perf.pitch[(perf.instrument == DRUM) & ((perf.pitch < 35) | (perf.pitch > 81))]
            for pos, pitch in zip(unknown.tolist(), drums.tolist()):
                tokens[pos] = ("drum", pitch)
        return tokens

    def _prefix_ids(self, perf: Performance, rng: np.random.Generator | None) -> np.ndarray:
        tokens = [("prefix", "instrument", i) for i in perf.instruments if i in self.instruments_wd]
        c = self.config
        for kind, names in (("composer", c.composers), ("form", c.forms), ("genre", c.genres)):
            value = perf.metadata.get(kind)
            if value and value in names:
                tokens.append(("prefix", kind, value))
        ids = np.array(sorted(self.tok_to_id[t] for t in tokens), dtype=np.int64)
        if rng is not None:
            rng.shuffle(ids)
        return ids

    def _body_ids(self, perf: Performance, remove_preceding_silence: bool) -> np.ndarray:
        c, lay = self.config, self.layout
        if perf.n_notes == 0:
            raise ValueError("performance has no notes")
        onset = perf.onset_ms(remove_preceding_silence)
        segment = onset // c.segment_ms
        n_time = np.maximum(segment - np.concatenate(([0], segment[:-1])), 0)
        is_drum = perf.channel == DRUM_CHANNEL
        note_len = np.where(is_drum, 2 if c.include_drums else 0, 3)
        ends = np.cumsum(n_time + note_len)
        at = ends - note_len  # position of each note's first token
        body = np.full(int(ends[-1]) if len(ends) else 0, TIME, dtype=np.int64)

        onset_ids = lay.onset + self._onset_step[onset % c.segment_ms]
        played = ~is_drum
        vel = self._velocity_step[perf.velocity[played]]
        body[at[played]] = (
            lay.note
            + perf.instrument[played].astype(np.int64) * 128 * len(self.velocities)
            + perf.pitch[played].astype(np.int64) * len(self.velocities)
            + vel
        )
        body[at[played] + 1] = onset_ids[played]
        duration = perf.duration_ms()[played]
        body[at[played] + 2] = lay.dur + self._dur_step[np.clip(duration, 0, c.max_dur_ms)]
        if c.include_drums and is_drum.any():
            pitch = perf.pitch[is_drum].astype(np.int64)
            in_kit = (pitch >= 35) & (pitch <= 81)
            body[at[is_drum]] = np.where(in_kit, lay.drum + pitch - 35, UNK)
            body[at[is_drum] + 1] = onset_ids[is_drum]
        return body

    def _dim_position(self, body: np.ndarray, rng: np.random.Generator | None) -> int:
        c, lay = self.config, self.layout
        jitter = int(rng.integers(-c.dim_jitter, c.dim_jitter + 1)) if rng is not None else 0
        pos = len(body) - c.dim_offset + jitter
        # Aria moves <D> back so it never splits a note from its onset/duration.
        if body[pos] >= lay.onset:
            return pos - 1
        if lay.dur <= body[pos] < lay.onset:
            return pos - 2
        return pos

    # -- detokenize ---------------------------------------------------------
    def detokenize(self, tokens: list[Token], **_: Any) -> Performance:
        """Tokens -> Performance on Aria's 1 tick = 1 ms timebase."""
        return self.detokenize_ids(np.array(self.encode(tokens), dtype=np.int64))

    def detokenize_ids(self, ids) -> Performance:
        """Aria's decoding: channels from instrument prefixes, then (note, onset, dur) / (drum, onset) windows."""
        ids = np.asarray(ids, dtype=np.int64)
        c, lay = self.config, self.layout
        body_start, channel_of = self._read_header(ids)
        base = c.segment_ms * np.concatenate(([0], np.cumsum(ids == TIME)[:-1]))
        cand = np.arange(body_start, max(len(ids) - 2, body_start))
        first, second, third = ids[cand], ids[cand + 1], ids[cand + 2]
        is_onset2 = second >= lay.onset
        is_note = (first >= lay.note) & (first < lay.drum) & is_onset2 & (third >= lay.dur) & (third < lay.onset)
        is_drum = (first >= lay.drum) & (first < lay.dur) & is_onset2
        n_vel = len(self.velocities)
        note_inst = (first - lay.note) // (128 * n_vel)
        instrument = np.where(is_drum, DRUM, note_inst)
        known = np.array([channel_of.get(int(i), -1) >= 0 for i in range(len(INSTRUMENTS))])
        keep = (is_note | is_drum) & known[np.clip(instrument, 0, len(INSTRUMENTS) - 1)]
        if ((is_note | is_drum) & ~keep).any():
            log.warning("dropped notes whose instrument has no prefix token")
        pos = cand[keep]
        drum = is_drum[keep]
        rel = first[keep] - lay.note
        onset = base[pos] + (second[keep] - lay.onset) * c.time_step_ms
        duration = np.where(drum, c.time_step_ms, (third[keep] - lay.dur) * c.time_step_ms)
        inst = instrument[keep]
        channel_lut = np.array([channel_of.get(i, 0) for i in range(len(INSTRUMENTS))])
        return Performance.from_ms(
            onset_ms=onset,
            duration_ms=duration,
            pitch=np.where(drum, first[keep] - lay.drum + 35, (rel // n_vel) % 128),
            velocity=np.where(drum, c.drum_velocity, (rel % n_vel) * c.velocity_step),
            instrument=inst,
            channel=channel_lut[inst],
            instruments=tuple(INSTRUMENTS[i] for i in sorted(channel_of)),
        )

    def _read_header(self, ids: np.ndarray) -> tuple[int, dict[int, int]]:
        """Where the body starts, and the channel Aria assigns each prefixed instrument."""
        lay = self.layout
        channel_of: dict[int, int] = {}
        next_channel = 0
        for pos, tok in enumerate(ids.tolist()):
            if next_channel == DRUM_CHANNEL:
                next_channel += 1
            if tok < lay.prefix:
                continue
            if tok >= lay.note:
                return pos, channel_of
            instrument = tok - lay.prefix
            if instrument < len(self.instruments_wd) and instrument not in channel_of:
                channel_of[instrument] = DRUM_CHANNEL if instrument == DRUM else next_channel
                next_channel += instrument != DRUM
        return len(ids), channel_of

    # -- augmentation -------------------------------------------------------
    def export_data_aug(self) -> list[Callable[[np.ndarray, np.random.Generator], np.ndarray]]:
        """Aria's training augmentations in Aria's order: tempo, pitch, velocity."""
        from aria_model.augmentation import export_data_aug

        return export_data_aug(self)


def instrument_program(name: str) -> int:
    """Program number Aria writes for an instrument class when decoding."""
    return PROGRAM_OF_INSTRUMENT[name]
