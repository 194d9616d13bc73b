"""MIDI file -> ``Performance``: Aria's MidiDict semantics on numpy arrays.

``load_midi`` reproduces what Aria's ``MidiDict`` + ``AbsTokenizer`` see, so
that tokenizing a Performance gives Aria's ids exactly. mido is the parser of
record (``engine="mido"``); the default ``engine="fast"`` reads the same events
with the compiled reader in ``aria_model.midi_fast`` and hands any file it does
not support to mido (``Performance.parsed_by`` says which did the work):

- note-on/off are paired per track and per (pitch, channel): a note-off (or
  note-on with velocity 0) closes every open note of that key that did not
  start on the same tick; a note-on and note-off on one tick drop the note;
  unmatched note-offs and never-closed note-ons are ignored;
- tracks are merged and notes stably sorted by start tick;
- a channel that ever selects a program of an ignored family (chromatic,
  synth pad/effect, ethnic, percussive, sfx) is removed whole, except channel 9
  (drums), which is never removed;
- sustain pedal (CC64 >= 64 is down) is folded into note ends per channel: an
  end strictly inside a pedal interval moves to the pedal release; a pedal left
  down closes at the end of the last note;
- times stay in ticks with the tempo map; ``Performance.onset_ms`` and
  ``duration_ms`` convert them exactly as Aria does (see ``aria_model.tempo``).

Bad files raise ``MidiError`` whose ``reason`` is the quarantine reason class.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mido
import numpy as np

from aria_model.tempo import elapsed_ms

# Program // 8 -> family, General MIDI order.
PROGRAM_FAMILIES = (
    "piano", "chromatic", "organ", "guitar", "bass", "strings", "ensemble", "brass",
    "reed", "pipe", "synth_lead", "synth_pad", "synth_effect", "ethnic", "percussive", "sfx",
)
IGNORED_FAMILIES = frozenset({"chromatic", "synth_pad", "synth_effect", "ethnic", "percussive", "sfx"})
# Instrument classes in Aria's vocabulary order; "drum" last, for channel 9.
INSTRUMENTS = tuple(f for f in PROGRAM_FAMILIES if f not in IGNORED_FAMILIES) + ("drum",)
DRUM = INSTRUMENTS.index("drum")
DRUM_CHANNEL = 9
DEFAULT_TEMPO_US = 500_000
PEDAL_CONTROL = 64

_FAMILY_TO_INSTRUMENT = {f: INSTRUMENTS.index(f) for f in INSTRUMENTS if f != "drum"}


class MidiError(ValueError):
    """A MIDI file that cannot become a Performance; ``reason`` is its quarantine class."""

    REASONS = ("empty_file", "not_midi", "truncated", "corrupt", "no_notes", "too_long")

    def __init__(self, reason: str, message: str):
        assert reason in self.REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.parsed_by: str | None = None  # set by load_midi, as on Performance


@dataclass
class Performance:
    """Notes with exact tick timing, the tempo map, and what the tokenizer needs.

    Note arrays are aligned and sorted by start tick (stable, as Aria sorts).
    ``end_tick`` already includes the sustain-pedal extension (drums excepted).
    ``instrument`` indexes ``INSTRUMENTS``. ``instruments`` lists the instrument
    prefix classes of the file (programs declared on non-drum channels even
    without notes, plus "drum" when channel 9 has notes), as Aria derives them.
    ``parsed_by``: "fast", "mido" or "mido-fallback" (the fast reader declined
    the file) when made by ``load_midi``.
    """

    start_tick: np.ndarray
    end_tick: np.ndarray
    pitch: np.ndarray
    velocity: np.ndarray
    channel: np.ndarray
    instrument: np.ndarray
    tempo_tick: np.ndarray
    tempo_us: np.ndarray
    ticks_per_beat: int
    instruments: tuple[str, ...]
    pedal_tick: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pedal_channel: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    pedal_down: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    texts: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    n_parsed_notes: int = 0
    parsed_by: str | None = None

    @property
    def n_notes(self) -> int:
        return len(self.start_tick)

    def onset_ms(self, remove_preceding_silence: bool = True) -> np.ndarray:
        """Note starts in ms, from the first note (default) or from tick 0."""
        origin = int(self.start_tick[0]) if remove_preceding_silence and self.n_notes else 0
        return elapsed_ms(origin, self.start_tick, self.tempo_tick, self.tempo_us, self.ticks_per_beat)

    def duration_ms(self) -> np.ndarray:
        """Pedal-extended note lengths in ms, each measured from its own start as Aria does."""
        return elapsed_ms(self.start_tick, self.end_tick, self.tempo_tick, self.tempo_us, self.ticks_per_beat)

    def length_ms(self) -> int:
        """From the first onset to the last note end (0 for an empty performance)."""
        if not self.n_notes:
            return 0
        return int((self.onset_ms() + self.duration_ms()).max())

    @classmethod
    def from_ms(
        cls,
        onset_ms: np.ndarray,
        duration_ms: np.ndarray,
        pitch: np.ndarray,
        velocity: np.ndarray,
        instrument: np.ndarray,
        channel: np.ndarray,
        instruments: tuple[str, ...],
        metadata: dict[str, Any] | None = None,
    ) -> "Performance":
        """A Performance on Aria's decoding timebase (500 ticks/beat at 120 bpm: 1 tick = 1 ms)."""
        order = np.argsort(onset_ms, kind="stable")
        onset = np.asarray(onset_ms, np.int64)[order]
        return cls(
            start_tick=onset,
            end_tick=onset + np.asarray(duration_ms, np.int64)[order],
            pitch=np.asarray(pitch, np.uint8)[order],
            velocity=np.asarray(velocity, np.uint8)[order],
            channel=np.asarray(channel, np.uint8)[order],
            instrument=np.asarray(instrument, np.uint8)[order],
            tempo_tick=np.zeros(1, np.int64),
            tempo_us=np.full(1, DEFAULT_TEMPO_US, np.int64),
            ticks_per_beat=500,
            instruments=instruments,
            metadata=dict(metadata or {}),
            n_parsed_notes=len(order),
        )


@dataclass
class _TrackEvents:
    """Messages of all tracks in Aria's order: per track, in file order."""

    note_start: list[int] = field(default_factory=list)
    note_end: list[int] = field(default_factory=list)
    note_pitch: list[int] = field(default_factory=list)
    note_velocity: list[int] = field(default_factory=list)
    note_channel: list[int] = field(default_factory=list)
    tempos: list[tuple[int, int]] = field(default_factory=list)
    pedals: list[tuple[int, int, bool]] = field(default_factory=list)
    programs: list[tuple[int, int, int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


ENGINES = ("fast", "mido")


def load_midi(
    source: str | os.PathLike | bytes,
    metadata: dict[str, Any] | None = None,
    max_notes: int | None = None,
    engine: str = "fast",
) -> Performance:
    """Parse a MIDI file (path or bytes) into a Performance; raise MidiError if unusable.

    ``engine``: "fast" (compiled reader, mido for the files it declines) or "mido".
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {ENGINES}")
    data = _read_bytes(source)
    parsed_by = "mido"
    if engine == "fast":
        from aria_model import midi_fast  # on first use: it imports this module, and numba is slow to load

        try:
            return midi_fast.read_performance(data, metadata, max_notes)
        except midi_fast.Unsupported:
            parsed_by = "mido-fallback"
        except MidiError as exc:
            exc.parsed_by = "fast"
            raise
    try:
        midi = _read_midi_file(data)
    except MidiError as exc:
        exc.parsed_by = parsed_by
        raise
    events = _extract_events(midi)
    n_parsed = len(events.note_start)
    try:
        if max_notes is not None and n_parsed > max_notes:
            raise MidiError("too_long", f"{n_parsed} notes exceed the limit of {max_notes}")
        perf = _build_performance(events, midi.ticks_per_beat, metadata or {})
    except MidiError as exc:
        exc.parsed_by = parsed_by
        raise
    perf.n_parsed_notes = n_parsed
    perf.parsed_by = parsed_by
    return perf


def _read_bytes(source: str | os.PathLike | bytes) -> bytes:
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if not data:
        raise MidiError("empty_file", "file has 0 bytes")
    if not data.startswith(b"MThd"):
        raise MidiError("not_midi", f"no MThd header (starts with {data[:8]!r})")
    return data


def _read_midi_file(data: bytes) -> mido.MidiFile:
    try:
        midi = mido.MidiFile(file=io.BytesIO(data))
    except EOFError as exc:
        raise MidiError("truncated", f"file ends inside a chunk ({exc or 'unexpected end of data'})") from exc
    except Exception as exc:  # whatever mido rejects (e.g. KeySignatureError, a bare Exception) is a corrupt file
        raise MidiError("corrupt", f"{type(exc).__name__}: {exc}") from exc
    if midi.ticks_per_beat <= 0:
        raise MidiError("corrupt", f"unsupported time division {midi.ticks_per_beat} (SMPTE timing)")
    return midi


def _extract_events(midi: mido.MidiFile) -> _TrackEvents:
    events = _TrackEvents()
    for track in midi.tracks:
        _extract_track(track, events)
    return events


def _extract_track(track: mido.MidiTrack, ev: _TrackEvents) -> None:
    # Hot loop: one pass over the messages, attribute access only on the kinds we keep.
    open_notes: dict[tuple[int, int], list[tuple[int, int]]] = {}
    tick = 0
    for msg in track:
        tick += msg.time
        kind = msg.type
        if kind == "note_on" and msg.velocity > 0:
            open_notes.setdefault((msg.note, msg.channel), []).append((tick, msg.velocity))
        elif kind == "note_off" or kind == "note_on":
            _close_notes(open_notes, (msg.note, msg.channel), tick, ev)
        elif kind == "control_change":
            if msg.control == PEDAL_CONTROL:
                ev.pedals.append((tick, msg.channel, msg.value >= 64))
        elif kind == "program_change":
            ev.programs.append((tick, msg.channel, msg.program))
        elif kind == "set_tempo":
            ev.tempos.append((tick, msg.tempo))
        elif kind == "text" or kind == "copyright":
            ev.texts.append(msg.text)


def _close_notes(open_notes, key, tick: int, ev: _TrackEvents) -> None:
    stack = open_notes.get(key)
    if stack is None:
        return
    staying = [(start, vel) for start, vel in stack if start == tick]
    closed = [(start, vel) for start, vel in stack if start != tick]
    for start, velocity in closed:
        ev.note_start.append(start)
        ev.note_end.append(tick)
        ev.note_pitch.append(key[0])
        ev.note_velocity.append(velocity)
        ev.note_channel.append(key[1])
    # Aria keeps same-tick note-ons only when something else was closed with them.
    if closed and staying:
        open_notes[key] = staying
    else:
        del open_notes[key]


def _sorted_by_tick(rows: list[tuple], width: int) -> np.ndarray:
    table = np.array(rows, dtype=np.int64).reshape(-1, width)
    return table[np.argsort(table[:, 0], kind="stable")]


def _build_performance(ev: _TrackEvents, ticks_per_beat: int, metadata: dict[str, Any]) -> Performance:
    starts = np.array(ev.note_start, dtype=np.int64)
    order = np.argsort(starts, kind="stable")
    start = starts[order]
    end = np.array(ev.note_end, dtype=np.int64)[order]
    pitch = np.array(ev.note_pitch, dtype=np.uint8)[order]
    velocity = np.array(ev.note_velocity, dtype=np.uint8)[order]
    channel = np.array(ev.note_channel, dtype=np.uint8)[order]

    tempos = _sorted_by_tick(ev.tempos, 2) if ev.tempos else np.array([[0, DEFAULT_TEMPO_US]], np.int64)
    programs = _sorted_by_tick(ev.programs, 3) if ev.programs else np.array([[0, 0, 0]], np.int64)
    pedals = _sorted_by_tick(ev.pedals, 3)

    removed = _ignored_channels(programs)
    keep_notes = ~np.isin(channel, removed)
    if not keep_notes.any():
        raise MidiError("no_notes", no_notes_message(len(starts), removed))
    start, end, pitch, velocity, channel = (a[keep_notes] for a in (start, end, pitch, velocity, channel))
    programs = programs[~np.isin(programs[:, 1], removed)]
    pedals = pedals[~np.isin(pedals[:, 1], removed)]

    channel_instrument = _channel_instruments(programs, channel)
    instrument_of_channel = np.full(16, DRUM, np.uint8)
    for ch, inst in channel_instrument.items():
        instrument_of_channel[ch] = inst
    instrument = instrument_of_channel[channel]
    end = _fold_pedal(start, end, channel, pedals)
    declared = set(channel_instrument.values()) | ({DRUM} if (channel == DRUM_CHANNEL).any() else set())
    return Performance(
        start_tick=start,
        end_tick=end,
        pitch=pitch,
        velocity=velocity,
        channel=channel,
        instrument=instrument,
        tempo_tick=tempos[:, 0].copy(),
        tempo_us=tempos[:, 1].copy(),
        ticks_per_beat=int(ticks_per_beat),
        instruments=tuple(INSTRUMENTS[i] for i in sorted(declared)),
        pedal_tick=pedals[:, 0].copy(),
        pedal_channel=pedals[:, 1].astype(np.uint8),
        pedal_down=pedals[:, 2].astype(bool),
        texts=tuple(ev.texts),
        metadata=dict(metadata),
    )


def _ignored_channels(programs: np.ndarray) -> np.ndarray:
    families = np.array(PROGRAM_FAMILIES)[programs[:, 2] // 8]
    ignored = np.isin(families, list(IGNORED_FAMILIES)) & (programs[:, 1] != DRUM_CHANNEL)
    return np.unique(programs[ignored, 1])


def no_notes_message(n_parsed: int, removed: np.ndarray) -> str:
    if n_parsed == 0:
        return "file contains no notes"
    return (
        f"all {n_parsed} notes are on channels {removed.tolist()} whose programs belong to "
        f"instrument families Aria ignores ({', '.join(sorted(IGNORED_FAMILIES))})"
    )


def _channel_instruments(programs: np.ndarray, note_channels: np.ndarray) -> dict[int, int]:
    """Instrument class per non-drum channel: its last program, piano when it has none."""
    mapping: dict[int, int] = {}
    for _, ch, program in programs.tolist():
        if ch != DRUM_CHANNEL:
            mapping[ch] = _FAMILY_TO_INSTRUMENT[PROGRAM_FAMILIES[program // 8]]
    for ch in np.unique(note_channels).tolist():
        if ch != DRUM_CHANNEL:
            mapping.setdefault(ch, _FAMILY_TO_INSTRUMENT["piano"])
    return mapping


def pedal_intervals(pedals: np.ndarray, last_note_end: int) -> dict[int, np.ndarray]:
    """Per channel, [down, up] tick intervals (Aria: repeated downs/ups are ignored)."""
    down_since: dict[int, int] = {}
    intervals: dict[int, list[tuple[int, int]]] = {}
    for tick, ch, is_down in pedals.tolist():
        if is_down and ch not in down_since:
            down_since[ch] = tick
        elif not is_down and ch in down_since:
            intervals.setdefault(ch, []).append((down_since.pop(ch), tick))
    for ch, tick in down_since.items():
        intervals.setdefault(ch, []).append((tick, last_note_end))
    return {ch: np.array(iv, dtype=np.int64) for ch, iv in intervals.items()}


def _fold_pedal(start: np.ndarray, end: np.ndarray, channel: np.ndarray, pedals: np.ndarray) -> np.ndarray:
    if not len(pedals):
        return end
    # Aria closes a pedal left down at the end of the last note in start order.
    intervals = pedal_intervals(pedals, int(end[-1]))
    end = end.copy()
    for ch, iv in intervals.items():
        if ch == DRUM_CHANNEL:
            continue
        on_channel = np.nonzero(channel == ch)[0]
        # Intervals are disjoint and in order, so only the last one starting
        # before a note's end can strictly contain that end.
        k = np.searchsorted(iv[:, 0], end[on_channel], side="left") - 1
        valid = k >= 0
        idx, k = on_channel[valid], k[valid]
        inside = end[idx] < iv[k, 1]
        end[idx[inside]] = iv[k[inside], 1]
    return end


# Program Aria writes for each instrument class when decoding tokens to MIDI.
PROGRAM_OF_INSTRUMENT = {
    "piano": 0, "organ": 16, "guitar": 24, "bass": 32, "strings": 40,
    "ensemble": 48, "brass": 56, "reed": 64, "pipe": 73, "synth_lead": 80, "drum": 0,
}


def resolve_overlaps(perf: Performance) -> np.ndarray:
    """End ticks with same-pitch, same-channel overlaps cut at the later onset (Aria's to_midi)."""
    end = perf.end_tick.copy()
    order = np.lexsort((perf.end_tick, perf.start_tick, perf.pitch, perf.channel))
    same_key = (np.diff(perf.channel[order].astype(int)) == 0) & (np.diff(perf.pitch[order].astype(int)) == 0)
    earlier, later = order[:-1][same_key], order[1:][same_key]
    overlapping = end[earlier] > perf.start_tick[later]
    end[earlier[overlapping]] = perf.start_tick[later[overlapping]]
    return end


def save_midi(perf: Performance, path: str | os.PathLike) -> None:
    """Write a Performance as a type-0 MIDI file the way Aria's ``MidiDict.to_midi`` does.

    Same-key overlaps are resolved first; note-offs are note-ons with velocity 0
    and come before note-ons on the same tick. Tempo, program and pedal
    messages are written ahead of notes on their tick so players apply them.
    """
    end = resolve_overlaps(perf)
    events: list[tuple[int, int, mido.Message]] = []
    for tick, tempo in zip(perf.tempo_tick.tolist(), perf.tempo_us.tolist()):
        events.append((tick, 0, mido.MetaMessage("set_tempo", tempo=tempo, time=tick)))
    for ch, inst in sorted({(int(c), int(i)) for c, i in zip(perf.channel, perf.instrument)}):
        program = PROGRAM_OF_INSTRUMENT[INSTRUMENTS[inst]]
        events.append((0, 0, mido.Message("program_change", program=program, channel=ch, time=0)))
    for tick, ch, down in zip(perf.pedal_tick.tolist(), perf.pedal_channel.tolist(), perf.pedal_down.tolist()):
        events.append((tick, 0, mido.Message("control_change", control=PEDAL_CONTROL, value=127 * down,
                                             channel=ch, time=tick)))
    for start, stop, pitch, vel, ch in zip(perf.start_tick.tolist(), end.tolist(), perf.pitch.tolist(),
                                           perf.velocity.tolist(), perf.channel.tolist()):
        events.append((start, 2 + vel, mido.Message("note_on", note=pitch, velocity=vel, channel=ch, time=start)))
        events.append((stop, 1, mido.Message("note_on", note=pitch, velocity=0, channel=ch, time=stop)))
    track = mido.MidiTrack()
    previous = 0
    for tick, _, msg in sorted(events, key=lambda e: (e[0], e[1])):
        track.append(msg.copy(time=tick - previous))
        previous = tick
    track.append(mido.MetaMessage("end_of_track", time=0))
    midi = mido.MidiFile(type=0, ticks_per_beat=perf.ticks_per_beat)
    midi.tracks.append(track)
    midi.save(path)
