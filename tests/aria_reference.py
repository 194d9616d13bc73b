"""Aria's reference MIDI -> token pipeline, restated the slow, literal way.

This is the oracle for differential tests and the baseline for ``bench/ingest.py``.
It follows the algorithm of EleutherAI's ``ariautils`` (``MidiDict``/``midi_to_dict``,
``get_duration_ms`` and ``AbsTokenizer._tokenize_midi_dict``, default config),
which is not installable here, step by step and in the same order, so that it
reproduces the reference ids exactly, quirks included. It deliberately shares no
code with ``aria_model``: it works message by message and note by note on plain
lists and dicts, as the reference does, and builds its own vocabulary.

    reference_parse(path_or_bytes)        -> ReferenceMidi (what MidiDict holds)
    reference_tokens(path_or_bytes)       -> Aria tokens, prefix in vocabulary order
    reference_token_ids(path_or_bytes)    -> ids (no <D> unless ``dim_jitter`` is given)
    reference_error(path_or_bytes)        -> None, or the reason the reference rejects it

The pipeline, as the reference runs it:

1. mido parses the file. Per track, delta times become absolute ticks; note-ons
   (velocity > 0) are pushed on a stack per (pitch, channel); a note-off (or a
   note-on with velocity 0) closes every open note of that key except those
   started on that very tick, which survive only if something else was closed.
2. Tracks are concatenated, every message list is stably sorted by tick; a
   missing tempo defaults to 500000 us at tick 0, a missing program to piano on
   channel 0.
3. Channels that ever select a program (1..127) of an ignored family lose all
   their messages (channel 9 never does). No note left: the reference raises.
4. Sustain pedal intervals per channel (down at CC64 >= 64, repeats ignored, a
   pedal left down ends at the end of the last note in start order); a note end
   strictly inside an interval moves to the interval's end.
5. Per note, milliseconds come from walking the tempo map in float seconds and
   rounding half-to-even; onsets from the first note's start tick (by default).
6. Per note: ``<T>`` for each 5000 ms segment boundary crossed, then
   ``(instrument, pitch, velocity) (onset) (dur)`` or ``(drum, pitch) (onset)``,
   each value snapped to its grid by the reference's binary search.
"""

from __future__ import annotations

import io
import itertools
import os
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any

import mido
from mido.midifiles.units import tick2second

# -- vocabulary (default ``tokenizer.abs`` config, vocab 17,727) -------------------------

SPECIAL_TOKENS = ["<S>", "<E>", "<P>", "<U>", "<D>", "<T>"]
BOS, EOS, UNK, DIM, TIME = "<S>", "<E>", "<U>", "<D>", "<T>"
# GM program // 8 -> family name.
FAMILIES = [
    "piano", "chromatic", "organ", "guitar", "bass", "strings", "ensemble", "brass",
    "reed", "pipe", "synth_lead", "synth_pad", "synth_effect", "ethnic", "percussive", "sfx",
]
IGNORED_FAMILIES = {"chromatic", "synth_pad", "synth_effect", "ethnic", "percussive", "sfx"}
NOTE_INSTRUMENTS = [f for f in FAMILIES if f not in IGNORED_FAMILIES]
COMPOSERS = ["bach", "beethoven", "mozart", "chopin", "rachmaninoff", "liszt",
             "debussy", "schubert", "brahms", "ravel", "satie", "scarlatti"]
FORMS = ["sonata", "prelude", "nocturne", "étude", "waltz", "mazurka", "impromptu", "fugue"]
GENRES = ["jazz", "classical"]

SEGMENT_MS = 5000  # one <T> per segment; onsets are measured within it
TIME_STEP_MS = 10
VELOCITY_STEP = 10
VELOCITY_GRID = [VELOCITY_STEP * i for i in range(int(127 / VELOCITY_STEP) + 1)]  # 0..120
DURATION_GRID = [TIME_STEP_MS * i for i in range(SEGMENT_MS // TIME_STEP_MS + 1)]  # 0..5000
ONSET_GRID = [TIME_STEP_MS * i for i in range(SEGMENT_MS // TIME_STEP_MS)]  # 0..4990
DRUM_CHANNEL = 9
DEFAULT_TEMPO_US = 500_000
DIM_MIN_BODY = 150  # <D> only in bodies longer than this
DIM_OFFSET = 100  # ... inserted this many tokens before the end, +- a jitter of 10


def build_vocabulary() -> list:
    """Every token in id order: specials, prefixes, notes, drums, durations, onsets."""
    prefixes = (
        [("prefix", "instrument", x) for x in NOTE_INSTRUMENTS + ["drum"]]
        + [("prefix", "composer", x) for x in COMPOSERS]
        + [("prefix", "form", x) for x in FORMS]
        + [("prefix", "genre", x) for x in GENRES]
    )
    notes = list(itertools.product(NOTE_INSTRUMENTS, range(128), VELOCITY_GRID))
    drums = [("drum", p) for p in range(35, 82)]
    durations = [("dur", d) for d in DURATION_GRID]
    onsets = [("onset", o) for o in ONSET_GRID]
    return SPECIAL_TOKENS + prefixes + notes + drums + durations + onsets


VOCABULARY = build_vocabulary()
TOKEN_ID = {tok: i for i, tok in enumerate(VOCABULARY)}


def encode(tokens: list) -> list[int]:
    """Ids of tokens; tokens outside the vocabulary (drums off the GM kit) become <U>."""
    return [TOKEN_ID.get(tok, TOKEN_ID[UNK]) for tok in tokens]


# -- parsing: what Aria's MidiDict holds ---------------------------------------------------


class ReferenceNoNotes(Exception):
    """The reference's failure for a file with no note left after removing ignored instruments."""

    reason = "no_notes"


@dataclass
class ReferenceMidi:
    """Aria's MidiDict as plain lists of dicts; ticks throughout, each list sorted by tick."""

    notes: list[dict]  # pitch, start, end, velocity, channel
    tempos: list[dict]  # tick, tempo (us per beat)
    pedals: list[dict]  # tick, channel, down (CC64 value >= 64)
    programs: list[dict]  # tick, channel, program
    texts: list[str]
    ticks_per_beat: int
    metadata: dict[str, Any] = field(default_factory=dict)


def read_midi(source: str | os.PathLike | bytes) -> mido.MidiFile:
    """mido's parse of a path or of raw bytes (the reference opens paths; bytes parse the same)."""
    if isinstance(source, bytes):
        return mido.MidiFile(file=io.BytesIO(source))
    return mido.MidiFile(Path(source))


def reference_parse(source: str | os.PathLike | bytes | mido.MidiFile) -> ReferenceMidi:
    """MIDI file -> ReferenceMidi, as ``MidiDict.from_midi`` builds it (no metadata extraction)."""
    midi = source if isinstance(source, mido.MidiFile) else read_midi(source)
    notes, tempos, pedals, programs, texts = [], [], [], [], []
    for track in midi.tracks:
        track_notes, track_tempos, track_pedals, track_programs, track_texts = _parse_track(track)
        notes += track_notes
        tempos += track_tempos
        pedals += track_pedals
        programs += track_programs
        texts += track_texts
    # Stable sorts: messages on one tick keep their track order, as in the reference.
    by_tick = itemgetter("tick")
    notes = sorted(notes, key=itemgetter("start"))
    tempos = sorted(tempos, key=by_tick) or [{"tick": 0, "tempo": DEFAULT_TEMPO_US}]
    programs = sorted(programs, key=by_tick) or [{"tick": 0, "channel": 0, "program": 0}]
    return ReferenceMidi(
        notes=notes,
        tempos=tempos,
        pedals=sorted(pedals, key=by_tick),
        programs=programs,
        texts=texts,
        ticks_per_beat=midi.ticks_per_beat,
    )


def _parse_track(track: mido.MidiTrack) -> tuple[list, list, list, list, list]:
    """One track's messages, with notes paired per (pitch, channel) by a dict of stacks."""
    notes, tempos, pedals, programs, texts = [], [], [], [], []
    open_notes: dict[tuple[int, int], list[tuple[int, int]]] = {}
    tick = 0
    for msg in track:
        tick += msg.time
        if msg.is_meta:
            if msg.type in ("text", "copyright"):
                texts.append(msg.text)
            elif msg.type == "set_tempo":
                tempos.append({"tick": tick, "tempo": msg.tempo})
        elif msg.type == "program_change":
            programs.append({"tick": tick, "channel": msg.channel, "program": msg.program})
        elif msg.type == "control_change" and msg.control == 64:
            pedals.append({"tick": tick, "channel": msg.channel, "down": msg.value >= 64})
        elif msg.type == "note_on" and msg.velocity > 0:
            open_notes.setdefault((msg.note, msg.channel), []).append((tick, msg.velocity))
        elif msg.type == "note_off" or msg.type == "note_on":
            notes += _close_key(open_notes, msg.note, msg.channel, tick)
    return notes, tempos, pedals, programs, texts


def _close_key(open_notes: dict, pitch: int, channel: int, tick: int) -> list[dict]:
    """Notes ended by a note-off at ``tick``; updates the stack of open notes of that key."""
    key = (pitch, channel)
    if key not in open_notes:
        return []  # a note-off with no note-on is ignored
    closing = [(start, vel) for start, vel in open_notes[key] if start != tick]
    same_tick = [(start, vel) for start, vel in open_notes[key] if start == tick]
    # The reference keeps a note-on from this very tick only when the note-off
    # also closed an older note; otherwise the whole key is forgotten.
    if closing and same_tick:
        open_notes[key] = same_tick
    else:
        del open_notes[key]
    return [
        {"pitch": pitch, "start": start, "end": tick, "velocity": vel, "channel": channel}
        for start, vel in closing
    ]


def remove_ignored_instruments(midi: ReferenceMidi) -> ReferenceMidi:
    """A copy without the channels that ever select an ignored program (never channel 9)."""
    removed = {
        msg["channel"]
        for msg in midi.programs
        if msg["program"] >= 1 and FAMILIES[msg["program"] // 8] in IGNORED_FAMILIES
        and msg["channel"] != DRUM_CHANNEL
    }
    return ReferenceMidi(
        notes=[n for n in midi.notes if n["channel"] not in removed],
        tempos=list(midi.tempos),
        pedals=[p for p in midi.pedals if p["channel"] not in removed],
        programs=[p for p in midi.programs if p["channel"] not in removed],
        texts=list(midi.texts),
        ticks_per_beat=midi.ticks_per_beat,
        metadata=dict(midi.metadata),
    )


def pedal_intervals(midi: ReferenceMidi) -> dict[int, list[tuple[int, int]]]:
    """Per channel, (down, up) tick intervals; a pedal left down ends with the last note."""
    intervals: dict[int, list[tuple[int, int]]] = {}
    down_since: dict[int, int] = {}
    for msg in midi.pedals:
        channel = msg["channel"]
        if msg["down"] and channel not in down_since:
            down_since[channel] = msg["tick"]
        elif not msg["down"] and channel in down_since:
            intervals.setdefault(channel, []).append((down_since.pop(channel), msg["tick"]))
    # "Last note" is the last in start order, not the one that ends last.
    final_tick = midi.notes[-1]["end"]
    for channel, start in down_since.items():
        intervals.setdefault(channel, []).append((start, final_tick))
    return intervals


def pedalled_end(end_tick: int, intervals: list[tuple[int, int]]) -> int:
    """A note end strictly inside a pedal interval moves to the pedal release."""
    for down, up in intervals:
        if down < end_tick < up:
            return up
    return end_tick


# -- time: the reference's tempo-map walk -------------------------------------------------


def elapsed_ms(start_tick: int, end_tick: int, tempos: list[dict], ticks_per_beat: int) -> int:
    """Milliseconds from start_tick to end_tick exactly as ``get_duration_ms`` computes them.

    The walk starts one tempo message before the first one at or after
    ``start_tick``; when none is at or after it, it starts at the second-to-last
    message (an off-by-one that adds a negative segment). Ticks before the first
    tempo use the first tempo. Float seconds are summed segment by segment and
    ``round`` (half to even) gives the integer.
    """
    first_at_or_after = len(tempos) - 1
    for i, msg in enumerate(tempos):
        if start_tick <= msg["tick"]:
            first_at_or_after = i
            break
    origin = max(first_at_or_after - 1, 0)
    seconds = 0.0
    tick = start_tick
    for here, after in zip(tempos[origin:], tempos[origin + 1:]):
        if end_tick < after["tick"]:
            seconds += tick2second(end_tick - tick, ticks_per_beat, here["tempo"])
            break
        seconds += tick2second(after["tick"] - tick, ticks_per_beat, here["tempo"])
        tick = after["tick"]
    if end_tick > tempos[-1]["tick"]:
        seconds += tick2second(end_tick - tick, ticks_per_beat, tempos[-1]["tempo"])
    return round(seconds * 1e3)


# -- quantisation -------------------------------------------------------------------------


def closest_on_grid(value: int, grid: list[int]) -> int:
    """The reference's binary search: the first grid value met that is strictly closer wins.

    Half-way ties therefore depend on the search path (15 -> 20 but 25 -> 20).
    """
    low, high = 0, len(grid) - 1
    best = None
    while low <= high:
        mid = (low + high) // 2
        if best is None or abs(grid[mid] - value) < abs(best - value):
            best = grid[mid]
        if grid[mid] < value:
            low = mid + 1
        else:
            high = mid - 1
    return best


def quantize_velocity(velocity: int) -> int:
    snapped = closest_on_grid(velocity, VELOCITY_GRID)
    return VELOCITY_STEP if snapped == 0 and velocity != 0 else snapped


def quantize_onset(ms_in_segment: int) -> int:
    return closest_on_grid(ms_in_segment, ONSET_GRID)


def quantize_duration(ms: int) -> int:
    snapped = closest_on_grid(ms, DURATION_GRID)
    return snapped if snapped != 0 else TIME_STEP_MS


# -- tokenization -------------------------------------------------------------------------


def channel_instruments(midi: ReferenceMidi) -> dict[int, str]:
    """Instrument of each non-drum channel: its last program's family, piano when it has none."""
    instruments = {
        msg["channel"]: FAMILIES[msg["program"] // 8]
        for msg in midi.programs
        if msg["channel"] != DRUM_CHANNEL
    }
    for note in midi.notes:
        if note["channel"] != DRUM_CHANNEL:
            instruments.setdefault(note["channel"], "piano")
    return instruments


def prefix_tokens(midi: ReferenceMidi, instruments: dict[int, str]) -> list[tuple]:
    """Instrument (and metadata) prefix tokens, in vocabulary order instead of shuffled."""
    prefix = [("prefix", "instrument", x) for x in set(instruments.values())]
    if any(note["channel"] == DRUM_CHANNEL for note in midi.notes):
        prefix.append(("prefix", "instrument", "drum"))
    for kind, names in (("composer", COMPOSERS), ("form", FORMS), ("genre", GENRES)):
        value = midi.metadata.get(kind)
        if value and value in names:
            prefix.append(("prefix", kind, value))
    return sorted(prefix, key=TOKEN_ID.__getitem__)


def note_events(midi: ReferenceMidi, remove_preceding_silence: bool = True) -> list[dict]:
    """Per note, unquantised ms: onset (from the first note or tick 0) and pedalled duration.

    ``midi`` must already be without ignored instruments. Drums have no duration.
    """
    intervals = pedal_intervals(midi)
    instruments = channel_instruments(midi)
    origin = midi.notes[0]["start"] if remove_preceding_silence else 0
    events = []
    for note in midi.notes:
        onset = elapsed_ms(origin, note["start"], midi.tempos, midi.ticks_per_beat)
        event = {"onset_ms": onset, "pitch": note["pitch"], "velocity": note["velocity"],
                 "channel": note["channel"]}
        if note["channel"] == DRUM_CHANNEL:
            event.update(instrument="drum", duration_ms=None)
        else:
            end = pedalled_end(note["end"], intervals.get(note["channel"], []))
            event.update(
                instrument=instruments[note["channel"]],
                duration_ms=elapsed_ms(note["start"], end, midi.tempos, midi.ticks_per_beat),
            )
        events.append(event)
    return events


def body_tokens(events: list[dict]) -> list:
    """<T> markers and one note (or drum hit) group per event."""
    body: list = []
    previous_ms = 0
    for event in events:
        onset_ms = event["onset_ms"]
        # Floor division on unquantised ms; a later onset can never remove a <T>.
        body += [TIME] * max(onset_ms // SEGMENT_MS - previous_ms // SEGMENT_MS, 0)
        previous_ms = onset_ms
        onset = ("onset", quantize_onset(onset_ms % SEGMENT_MS))
        if event["instrument"] == "drum":
            body += [("drum", event["pitch"]), onset]
        else:
            note = (event["instrument"], event["pitch"], quantize_velocity(event["velocity"]))
            body += [note, onset, ("dur", quantize_duration(event["duration_ms"]))]
    return body


def insert_dim_token(body: list, jitter: int) -> list:
    """The reference's <D>: 100 + jitter tokens before the end, moved back to precede a note."""
    body = list(body)
    if len(body) <= DIM_MIN_BODY:
        return body
    at = -DIM_OFFSET + jitter
    kind = body[at][0] if isinstance(body[at], tuple) else body[at]
    if kind == "onset":
        at -= 1
    elif kind == "dur":
        at -= 2
    body.insert(at, DIM)
    return body


def tokens_from_parsed(
    parsed: ReferenceMidi,
    remove_preceding_silence: bool = True,
    add_eos_tok: bool = True,
    dim_jitter: int | None = None,
) -> list:
    """Tokenize an already parsed file; raise ReferenceNoNotes as the reference does."""
    midi = remove_ignored_instruments(parsed)
    if not midi.notes:
        raise ReferenceNoNotes("note_msgs is empty after ignoring instruments")
    body = body_tokens(note_events(midi, remove_preceding_silence))
    if dim_jitter is not None:
        body = insert_dim_token(body, dim_jitter)
    tail = [EOS] if add_eos_tok else []
    return prefix_tokens(midi, channel_instruments(midi)) + [BOS] + body + tail


def reference_tokens(
    source: str | os.PathLike | bytes,
    remove_preceding_silence: bool = True,
    add_eos_tok: bool = True,
    dim_jitter: int | None = None,
    metadata: dict[str, Any] | None = None,
) -> list:
    """Aria tokens for a MIDI file; prefix in vocabulary order, <D> only if ``dim_jitter`` is set."""
    parsed = reference_parse(source)
    parsed.metadata = dict(metadata or {})
    return tokens_from_parsed(parsed, remove_preceding_silence, add_eos_tok, dim_jitter)


def reference_token_ids(source: str | os.PathLike | bytes, **options: Any) -> list[int]:
    """Ids of ``reference_tokens`` (same keywords)."""
    return encode(reference_tokens(source, **options))


def reference_error(source: str | os.PathLike | bytes) -> str | None:
    """Why the reference rejects a file: "no_notes", "unreadable: <exception>", or None.

    The reference itself raises a bare ``Exception("note_msgs is empty after
    ignoring instruments")`` when no note survives, and lets mido's own
    exceptions through for files mido cannot read.
    """
    try:
        parsed = reference_parse(source)
    except Exception as exc:  # noqa: BLE001  (mido raises many types)
        return f"unreadable: {type(exc).__name__}"
    try:
        tokens_from_parsed(parsed)
    except ReferenceNoNotes:
        return ReferenceNoNotes.reason
    return None
