"""What Aria's two tokenizers share: vocabulary, note ids, prefixes, ``<D>``, decoding.

``NoteTokenizer`` is the base of ``AbsTokenizer`` (``aria_model.tokenizer``:
absolute onsets, the released model's) and ``RelTokenizer``
(``aria_model.rel_tokenizer``: wait tokens, for the tokenizer ablation). Both
lay out their vocabulary as Aria does::

    special tokens | prefixes | (instrument, pitch, velocity) | (drum, note) | (dur, ms) | time tokens

and differ only in the last family and in how a body of notes is written with
it. A subclass names that family and its values, and implements ``_body_ids``
(Performance -> body ids), ``_read_body`` (ids -> notes and their onsets) and
``_completes_note`` (which tokens ``<D>`` must not precede). Everything else is
here:

- note ids: ``(inst, pitch, vel)``, ``(drum, note)`` for channel 9 (GM 35..81,
  other drums become ``<U>``), ``(dur, ms)``;
- quantisation lookup tables built with Aria's binary-search "closest" rule, so
  half-way ties resolve exactly as the reference does (15 -> 20 but 25 -> 20);
- ``[prefix tokens] <S> body [<D> inside the body] <E>``. Aria shuffles the
  prefixes and jitters ``<D>`` at random; here that happens only when an
  ``rng`` is passed. Without one the output is deterministic: prefixes in
  vocabulary order and ``<D>`` exactly 100 tokens before the end (the centre
  of Aria's jitter), moved back so that it precedes a note;
- decoding: the channel Aria gives each prefixed instrument, and the
  Performance (1 tick = 1 ms) built from the notes a subclass reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any, ClassVar

import numpy as np

from aria_model.midi import DRUM, DRUM_CHANNEL, INSTRUMENTS, Performance

log = logging.getLogger(__name__)

Token = str | tuple
SPECIAL_TOKENS = ("<S>", "<E>", "<P>", "<U>", "<D>", "<T>")
BOS, EOS, PAD, UNK, DIM, TIME = range(len(SPECIAL_TOKENS))
NOTE_INSTRUMENTS = INSTRUMENTS[:DRUM]
DRUM_NOTES = range(35, 82)  # the GM kit that has drum tokens


@dataclass(frozen=True)
class NoteTokenizerConfig:
    """Settings both tokenizers have; the defaults are the released model's.

    Subclasses add ``max_dur_ms`` (longest duration token; longer notes are
    clipped) and ``include_drums``.
    """

    time_step_ms: int = 10  # grid of onsets, waits and durations
    velocity_step: int = 10
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
    # Keeps configs of different tokenizers from hashing alike. None (AbsTokenizer)
    # hashes the fields alone, as before RelTokenizer existed, so shard manifests stay valid.
    tokenizer_tag: ClassVar[str | None] = None

    def config_hash(self) -> str:
        """Identity of the token set and its ids, for shard manifests."""
        payload = asdict(self)
        if self.tokenizer_tag is not None:
            payload["tokenizer"] = self.tokenizer_tag
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


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


def grid_index_table(grid: list[int], n_values: int) -> np.ndarray:
    """For each value 0..n_values-1, the index in ``grid`` of its ``closest_on_grid``."""
    index_of = {value: i for i, value in enumerate(grid)}
    return np.array([index_of[closest_on_grid(v, grid)] for v in range(n_values)], np.int64)


@dataclass(frozen=True)
class VocabLayout:
    """Id offsets of the token families both vocabularies have, in Aria's order.

    Subclasses add the offset of their time family, then ``size``.
    """

    prefix: int
    note: int
    drum: int
    dur: int


class NoteTokenizer(ABC):
    """Performance <-> ids, everything but the time representation. See the module docstring."""

    name: ClassVar[str]
    special_tokens: ClassVar[tuple[str, ...]]
    time_family: ClassVar[str]  # the time tokens' name, e.g. ("onset", 120)
    layout_type: ClassVar[type[VocabLayout]]

    def __init__(self, config: NoteTokenizerConfig, time_values: list[int]):
        self.config = c = config
        self.instruments_wd = INSTRUMENTS if c.include_drums else NOTE_INSTRUMENTS
        self.velocities = list(range(0, 128, c.velocity_step))[: 127 // c.velocity_step + 1]
        self.durations = list(range(0, c.max_dur_ms + 1, c.time_step_ms))
        self.time_values = time_values
        self.prefix_tokens = (
            [("prefix", "instrument", i) for i in self.instruments_wd]
            + [("prefix", "composer", x) for x in c.composers]
            + [("prefix", "form", x) for x in c.forms]
            + [("prefix", "genre", x) for x in c.genres]
        )
        prefix = len(self.special_tokens)
        note = prefix + len(self.prefix_tokens)
        drum = note + len(NOTE_INSTRUMENTS) * 128 * len(self.velocities)
        dur = drum + (len(DRUM_NOTES) if c.include_drums else 0)
        time = dur + len(self.durations)
        self.layout = self.layout_type(prefix, note, drum, dur, time, time + len(time_values))
        self.bos_id, self.eos_id, self.pad_id, self.unk_id, self.dim_id = BOS, EOS, PAD, UNK, DIM

    # -- vocabulary ---------------------------------------------------------
    @cached_property
    def vocab(self) -> list[Token]:
        notes = [(i, p, v) for i in NOTE_INSTRUMENTS for p in range(128) for v in self.velocities]
        drums = [("drum", p) for p in DRUM_NOTES] if self.config.include_drums else []
        return (
            list(self.special_tokens)
            + self.prefix_tokens
            + notes
            + drums
            + [("dur", d) for d in self.durations]
            + [(self.time_family, t) for t in self.time_values]
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
    def velocity_grid_index(self) -> np.ndarray:
        """Grid index of every MIDI velocity 0..127."""
        index = grid_index_table(self.velocities, 128)
        index[1:] = np.maximum(index[1:], 1)  # a sounding note never gets velocity 0
        return index

    @cached_property
    def duration_grid_index(self) -> np.ndarray:
        """Grid index of every duration 0..max_dur_ms (0 ms becomes one step)."""
        return np.maximum(grid_index_table(self.durations, self.config.max_dur_ms + 1), 1)

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
        if perf.n_notes == 0:
            raise ValueError("performance has no notes")
        body = self._body_ids(perf, remove_preceding_silence)
        if add_dim_tok and len(body) > self.config.dim_min_body:
            body = np.insert(body, self.dim_position(body, rng), DIM)
        parts = [self.prefix_ids(perf.instruments, perf.metadata, rng), np.array([BOS]), body]
        if add_eos_tok:
            parts.append(np.array([EOS]))
        return np.concatenate(parts).astype(np.uint16)

    def tokenize(self, perf: Performance, remove_preceding_silence: bool = True, add_dim_tok: bool = True,
                 add_eos_tok: bool = True, rng: np.random.Generator | None = None, **_: Any) -> list[Token]:
        """Aria-style tokens (tuples and strings) for a Performance."""
        ids = self.tokenize_ids(perf, remove_preceding_silence, add_dim_tok, add_eos_tok, rng)
        tokens = self.decode(ids)
        # Drum notes outside the GM kit have no id; Aria still emits their token.
        unknown = np.nonzero(ids == UNK)[0]
        if len(unknown):
            kit = (perf.pitch >= DRUM_NOTES.start) & (perf.pitch < DRUM_NOTES.stop)
            drums = perf.pitch[(perf.instrument == DRUM) & ~kit]
            for pos, pitch in zip(unknown.tolist(), drums.tolist()):
                tokens[pos] = ("drum", pitch)
        return tokens

    def prefix_ids(self, instruments: tuple[str, ...], metadata: dict[str, Any],
                   rng: np.random.Generator | None = None) -> np.ndarray:
        """The prefix of a performance with these instrument classes and metadata: in vocabulary
        order, or shuffled by ``rng``."""
        tokens = [("prefix", "instrument", i) for i in instruments if i in self.instruments_wd]
        c = self.config
        for kind, names in (("composer", c.composers), ("form", c.forms), ("genre", c.genres)):
            value = metadata.get(kind)
            if value and value in names:
                tokens.append(("prefix", kind, value))
        ids = np.array(sorted(self.tok_to_id[t] for t in tokens), dtype=np.int64)
        if rng is not None:
            rng.shuffle(ids)
        return ids

    def _note_ids(self, perf: Performance) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per note: whether it is a drum hit (channel 9), the id of its note token
        (``(inst, pitch, vel)``, or ``(drum, note)``: ``<U>`` outside the kit) and of its
        ``(dur)`` token (drum hits have none: ignore theirs)."""
        c, lay = self.config, self.layout
        is_drum = perf.channel == DRUM_CHANNEL
        pitch = perf.pitch.astype(np.int64)
        n_vel = len(self.velocities)
        played = (
            lay.note
            + perf.instrument.astype(np.int64) * 128 * n_vel
            + pitch * n_vel
            + self.velocity_grid_index[perf.velocity]
        )
        in_kit = (pitch >= DRUM_NOTES.start) & (pitch < DRUM_NOTES.stop)
        drum = np.where(in_kit, lay.drum + pitch - DRUM_NOTES.start, UNK)
        duration = lay.dur + self.duration_grid_index[np.clip(perf.duration_ms(), 0, c.max_dur_ms)]
        return is_drum, np.where(is_drum, drum, played), duration

    def dim_position(self, body: np.ndarray, rng: np.random.Generator | None) -> int:
        """Where ``tokenize_ids`` inserts ``<D>`` into a body (one ``rng.integers`` draw when given)."""
        c = self.config
        jitter = int(rng.integers(-c.dim_jitter, c.dim_jitter + 1)) if rng is not None else 0
        pos = len(body) - c.dim_offset + jitter
        # Aria moves <D> back so it never splits a note from the tokens that complete it.
        while self._completes_note(int(body[pos])):
            pos -= 1
        return pos

    @abstractmethod
    def _body_ids(self, perf: Performance, remove_preceding_silence: bool) -> np.ndarray:
        """The body between ``<S>`` and ``<E>`` of a Performance with notes."""

    @abstractmethod
    def _completes_note(self, token_id: int) -> bool:
        """Whether the token belongs to the note before it (so ``<D>`` must not precede it)."""

    # -- detokenize ---------------------------------------------------------
    def detokenize(self, tokens: list[Token], **_: Any) -> Performance:
        """Tokens -> Performance on Aria's 1 tick = 1 ms timebase."""
        return self.detokenize_ids(np.array(self.encode(tokens), dtype=np.int64))

    def detokenize_ids(self, ids) -> Performance:
        """Ids -> Performance (1 tick = 1 ms), decoded as Aria decodes.

        Channels come from the instrument prefixes; notes of an instrument
        without one are dropped (with a warning). Drum hits last one time step.
        """
        ids = np.asarray(ids, dtype=np.int64)
        body_start, channel_of = self._read_header(ids)
        note, duration, onset_ms = self._read_body(ids, body_start)
        c, lay = self.config, self.layout
        n_vel = len(self.velocities)
        drum = note >= lay.drum
        instrument = np.where(drum, DRUM, (note - lay.note) // (128 * n_vel))
        keep = np.isin(instrument, list(channel_of))
        if not keep.all():
            log.warning("dropped notes whose instrument has no prefix token")
        note, duration, onset_ms, drum, instrument = (a[keep] for a in (note, duration, onset_ms, drum, instrument))
        offset = note - lay.note
        channel_lut = np.array([channel_of.get(i, 0) for i in range(len(INSTRUMENTS))])
        return Performance.from_ms(
            onset_ms=onset_ms,
            duration_ms=np.where(drum, c.time_step_ms, (duration - lay.dur) * c.time_step_ms),
            pitch=np.where(drum, note - lay.drum + DRUM_NOTES.start, offset // n_vel % 128),
            velocity=np.where(drum, c.drum_velocity, offset % n_vel * c.velocity_step),
            instrument=instrument,
            channel=channel_lut[instrument],
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

    @abstractmethod
    def _read_body(self, ids: np.ndarray, body_start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The notes Aria's decoder finds from ``body_start`` on, in order: note token ids
        (note or drum), duration token ids (ignored for drums) and onsets in ms."""
