"""Compiled MIDI reader: bytes -> the Performance ``load_midi`` builds with mido.

mido builds a Python object per message, which is most of ``load_midi``'s time.
This module reads the Standard MIDI File bytes in numba-compiled code into the
rows ``midi._extract_events(mido.MidiFile(...))`` keeps, in the same order, and
``midi_fast_notes.assemble`` turns them into the Performance arrays:

1. ``_read_header``: MThd, as mido reads it (signed 16-bit fields; a negative
   track count reads no tracks; bytes past the header's 6 are skipped);
2. ``_scan_track``: one MTrk chunk -> rows (tick, kind, channel, a, b) for the
   kinds load_midi keeps; every other message is parsed and skipped;
3. ``midi_fast_notes.assemble``: note pairing, sorting, channels, pedal.

mido stays the parser of record. Whenever the bytes are anything mido could
read differently from the plain case (a message running past its chunk's end,
a data byte > 127, a system message, a meta event whose decoding raises in
mido, SMPTE time division, ...) ``read_performance`` raises ``Unsupported`` with the
reason and ``load_midi`` parses the file with mido instead, which also gives
bad files their quarantine reason. mido's behaviours reproduced here:

- delta times and lengths are variable-length quantities (more than 4 bytes:
  unsupported, which also keeps ticks far from int64 overflow);
- running status: a data byte where a status is expected repeats the last
  status; meta events do not change it, sysex (F0/F7) does, and a data byte
  after a sysex starts another sysex whose length follows that byte (mido
  drops the byte);
- a track ends only where its chunk says, not at end-of-track: messages after
  end-of-track are read; exactly the header's number of MTrk chunks are read
  and anything after them is ignored;
- a meta event of a type mido does not know loses its delta time (mido builds
  it without one), so the track's clock does not advance over it;
- text and copyright meta events are decoded as latin-1 (mido's charset).

    from aria_model.midi_fast import read_performance
    perf = read_performance(Path("x.mid").read_bytes())
"""

from __future__ import annotations

import functools

import numpy as np
from mido.midifiles.meta import _META_SPECS, MetaSpec_time_signature
from mido.midifiles.midifiles import MAX_MESSAGE_LENGTH
from numba import njit

from aria_model import midi_fast_notes as notes
from aria_model.midi import INSTRUMENTS, PEDAL_CONTROL, MidiError, Performance, no_notes_message
from aria_model.midi_fast_notes import NOTE_OFF, NOTE_ON, PEDAL, PROGRAM, TEMPO, TEXT

SKIPPED = -1  # a message that makes no row
# Meta types whose decoding in mido can raise on odd data (or that we keep).
SEQUENCE_NUMBER, TEXT_META, COPYRIGHT_META, CHANNEL_PREFIX = 0x00, 0x01, 0x02, 0x20
SET_TEMPO, SMPTE_OFFSET, TIME_SIGNATURE, KEY_SIGNATURE = 0x51, 0x54, 0x58, 0x59
MAX_VLQ_BYTES = 4  # the most the MIDI spec allows; mido reads longer ones, we hand those over

# Scan results: OK, or why the file goes to mido.
OK = 0
WHY_UNSUPPORTED = (
    "ok",
    "header shorter than 6 bytes",
    "SMPTE or zero time division",
    "chunk is not MTrk",
    "read past the end of the file",
    "message runs past its chunk",
    "data byte without a running status",
    "data byte > 127",
    "system common or real-time message",
    "variable-length quantity over 4 bytes",
    "message longer than mido's limit",
    "meta event mido cannot decode",
)
(_, SHORT_HEADER, BAD_DIVISION, NOT_MTRK, PAST_EOF, PAST_CHUNK, NO_RUNNING_STATUS, DATA_BYTE_HIGH,
 SYSTEM_MESSAGE, LONG_VLQ, TOO_LONG, BAD_META) = range(len(WHY_UNSUPPORTED))


def _mido_accepts_denominator(exponent: int) -> bool:
    try:
        MetaSpec_time_signature().check("denominator", 2**exponent)
    except ValueError:
        return False
    return True


# mido checks a time signature's denominator with an inexact float log2, so it
# rejects some powers of two (2**29, ...): ask mido which, once.
DENOMINATOR_EXPONENT_OK = np.array([_mido_accepts_denominator(e) for e in range(256)])
# Meta types mido knows; it drops the delta time of the others.
META_TYPE_KNOWN = np.array([meta_type in _META_SPECS for meta_type in range(256)])


class Unsupported(Exception):
    """The fast reader cannot prove it reads this file as mido does; ``str(exc)`` says why."""


def read_performance(data: bytes, metadata: dict | None = None, max_notes: int | None = None) -> Performance:
    """The Performance ``midi.load_midi`` builds with mido; raises ``Unsupported`` or ``MidiError``."""
    (status, ticks_per_beat, outcome, n_parsed, start, end, pitch, velocity, note_channel, instrument,
     tempo_tick, tempo_us, pedal_tick, pedal_channel, pedal_down, declared, removed, text_at, text_size) = _read_file(
        np.frombuffer(data, np.uint8), META_TYPE_KNOWN, DENOMINATOR_EXPONENT_OK, -1 if max_notes is None else max_notes
    )
    if status != OK:
        raise Unsupported(WHY_UNSUPPORTED[status])
    if outcome == notes.TOO_MANY_NOTES:
        raise MidiError("too_long", f"{n_parsed} notes exceed the limit of {max_notes}")
    if outcome == notes.NO_NOTES:
        raise MidiError("no_notes", no_notes_message(n_parsed, np.flatnonzero(removed)))
    return Performance(
        start_tick=start,
        end_tick=end,
        pitch=pitch,
        velocity=velocity,
        channel=note_channel,
        instrument=instrument,
        tempo_tick=tempo_tick,
        tempo_us=tempo_us,
        ticks_per_beat=ticks_per_beat,
        instruments=_instrument_classes(declared),
        pedal_tick=pedal_tick,
        pedal_channel=pedal_channel,
        pedal_down=pedal_down,
        texts=tuple(data[at : at + size].decode("latin-1") for at, size in zip(text_at.tolist(), text_size.tolist()))
        if len(text_at) else (),
        metadata=dict(metadata) if metadata else {},
        n_parsed_notes=n_parsed,
        parsed_by="fast",
    )


@functools.cache
def _instrument_classes(declared: int) -> tuple[str, ...]:
    """The instrument classes of a bit mask (bit i: ``INSTRUMENTS[i]``), in vocabulary order."""
    return tuple(name for i, name in enumerate(INSTRUMENTS) if declared >> i & 1)


@njit(cache=True)
def _read_file(data, meta_known, denominator_ok, max_notes):
    """One compiled call per file (each call's arguments and results cost microseconds to convert):
    (scan status, ticks per beat, ``assemble``'s results with the declared instruments as a bit
    mask, where the texts lie in ``data``)."""
    status, ticks_per_beat, tick, kind, channel, a, b, track_ends = _scan_file(data, meta_known, denominator_ok)
    if status != OK:  # nothing to assemble; the rows are incomplete
        tick, kind, channel, a, b, track_ends = tick[:0], kind[:0], channel[:0], a[:0], b[:0], track_ends[:0]
    (outcome, n_parsed, start, end, pitch, velocity, note_channel, instrument, tempo_tick, tempo_us,
     pedal_tick, pedal_channel, pedal_down, declared, removed) = notes.assemble(
        tick, kind, channel, a, b, track_ends, max_notes
    )
    declared_mask = 0
    for i in range(len(declared)):
        declared_mask |= np.int64(declared[i]) << i
    text = np.nonzero(kind == notes.TEXT)[0]
    return (status, ticks_per_beat, outcome, n_parsed, start, end, pitch, velocity, note_channel, instrument,
            tempo_tick, tempo_us, pedal_tick, pedal_channel, pedal_down, declared_mask, removed, a[text], b[text])


# -- compiled: header, tracks, messages --------------------------------------------------
# Functions return a status first; anything but OK abandons the file.


@njit(cache=True)
def _u16(data, pos):
    return (np.int64(data[pos]) << 8) | data[pos + 1]


@njit(cache=True)
def _s16(data, pos):
    value = _u16(data, pos)
    return value - 65536 if value >= 32768 else value


@njit(cache=True)
def _u32(data, pos):
    return (_u16(data, pos) << 16) | _u16(data, pos + 2)


@njit(cache=True)
def _read_vlq(data, pos):
    """(status, value, position after it)."""
    value = np.int64(0)
    for i in range(MAX_VLQ_BYTES):
        if pos + i >= len(data):
            return PAST_EOF, value, pos
        byte = data[pos + i]
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return OK, value, pos + i + 1
    return LONG_VLQ, value, pos


@njit(cache=True)
def _read_header(data):
    """(status, tracks to read, ticks per beat, position of the first track chunk)."""
    if len(data) < 14 or _u32(data, 4) < 6:
        return SHORT_HEADER, 0, 0, 0
    n_tracks = max(_s16(data, 10), 0)  # mido: range(negative) reads nothing
    ticks_per_beat = _s16(data, 12)
    if ticks_per_beat <= 0:
        return BAD_DIVISION, 0, 0, 0
    return OK, n_tracks, ticks_per_beat, min(8 + _u32(data, 4), len(data))


@njit(cache=True)
def _scan_file(data, meta_known, denominator_ok):
    """(status, ticks per beat, rows tick/kind/channel/a/b, end row of each track).

    a, b: pitch and velocity (notes), 64 and value (pedal), program, tempo, or
    where a text lies in ``data``; channel is meaningful on channel messages only.
    """
    # A message takes at least 2 bytes (delta, status or data), which bounds the rows.
    capacity = len(data) // 2 + 1
    tick = np.empty(capacity, np.int64)
    kind = np.empty(capacity, np.uint8)
    channel = np.empty(capacity, np.uint8)
    a = np.empty(capacity, np.int32)
    b = np.empty(capacity, np.int32)
    status, n_tracks, ticks_per_beat, pos = _read_header(data)
    track_ends = np.empty(n_tracks, np.int64)
    n = np.int64(0)
    for track in range(n_tracks if status == OK else 0):
        if pos + 8 > len(data):
            status = PAST_EOF
        elif data[pos] != 77 or data[pos + 1] != 84 or data[pos + 2] != 114 or data[pos + 3] != 107:  # "MTrk"
            status = NOT_MTRK
        else:
            chunk_end = pos + 8 + _u32(data, pos + 4)
            status, n = _scan_track(data, pos + 8, chunk_end, meta_known, denominator_ok, tick, kind, channel, a, b, n)
            pos = chunk_end
        if status != OK:
            break
        track_ends[track] = n
    return status, ticks_per_beat, tick[:n], kind[:n], channel[:n], a[:n], b[:n], track_ends


@njit(cache=True)
def _scan_track(data, pos, end, meta_known, denominator_ok, tick, kind, channel, a, b, n):
    """Append one chunk's rows from row n on; (status, rows now)."""
    now = np.int64(0)
    running = -1  # last status byte, none yet
    status = OK  # any other status returns at once
    while pos != end:  # mido stops only where the chunk ends exactly
        if pos < len(data) and data[pos] < 0x80:  # most delta times take one byte
            delta = np.int64(data[pos])
            pos += 1
        else:
            status, delta, pos = _read_vlq(data, pos)
            if status != OK:
                return status, n
        now += delta
        if pos >= len(data):
            return PAST_EOF, n
        status_byte = np.int64(data[pos])
        pos += 1
        first_data = -1
        if status_byte < 0x80:
            if running < 0:
                return NO_RUNNING_STATUS, n
            first_data, status_byte = status_byte, running
        elif status_byte != 0xFF:  # meta events leave the running status alone
            running = status_byte
        if status_byte == 0xFF:
            if pos < len(data) and not meta_known[data[pos]]:
                now -= delta  # mido builds unknown meta events without their delta time
            status, pos, row_kind, value_a, value_b = _meta_event(data, pos, denominator_ok)
        elif status_byte == 0xF0 or status_byte == 0xF7:
            status, pos, row_kind, value_a, value_b = _sysex(data, pos)  # mido drops a running-status data byte here
        elif status_byte > 0xF0:
            return SYSTEM_MESSAGE, n
        else:  # a channel message, read here: as a call returning a tuple it cost a third of the scan
            family = status_byte >> 4
            value_a, value_b = first_data, np.int64(0)  # first_data >= 0: read already (running status)
            if value_a < 0:
                if pos >= len(data):
                    return PAST_EOF, n
                value_a = np.int64(data[pos])
                pos += 1
            if family != 0xC and family != 0xD:  # all but program change and channel pressure have 2 data bytes
                if pos >= len(data):
                    return PAST_EOF, n
                value_b = np.int64(data[pos])
                pos += 1
            if value_a > 127 or value_b > 127:
                return DATA_BYTE_HIGH, n
            if family == 0x9 and value_b > 0:
                row_kind = NOTE_ON
            elif family == 0x8 or family == 0x9:
                row_kind = NOTE_OFF
            elif family == 0xB and value_a == PEDAL_CONTROL:
                row_kind = PEDAL
            elif family == 0xC:
                row_kind = PROGRAM
            else:
                row_kind = SKIPPED
        if status != OK:
            return status, n
        if pos > end:  # mido would read on into the next chunk's bytes
            return PAST_CHUNK, n
        if row_kind != SKIPPED:
            tick[n], kind[n], channel[n], a[n], b[n] = now, row_kind, status_byte & 0xF, value_a, value_b
            n += 1
    return OK, n


# Readers of the rarer messages (sysex, meta) take the position after the status
# byte and return (status, position after the message, row kind or SKIPPED, a, b).
# They take no output arrays: numba reference-counts the arrays passed to each
# call, which made the scan 4x slower when these wrote the rows themselves.


@njit(cache=True)
def _read_length(data, pos):
    """(status, length, position of the payload) of a sysex or meta payload that lies in the file."""
    status, length, pos = _read_vlq(data, pos)
    if status == OK and length > MAX_MESSAGE_LENGTH:
        status = TOO_LONG
    elif status == OK and pos + length > len(data):
        status = PAST_EOF
    return status, length, pos


@njit(cache=True)
def _sysex(data, pos):
    """An F0/F7 event: mido keeps its payload minus a leading F0 and a trailing F7,
    and rejects it if any byte left is > 127."""
    status, length, pos = _read_length(data, pos)
    if status != OK:
        return status, pos, SKIPPED, 0, 0
    first, last = pos, pos + length
    if first < last and data[first] == 0xF0:
        first += 1
    if first < last and data[last - 1] == 0xF7:
        last -= 1
    for i in range(first, last):
        if data[i] > 127:
            return DATA_BYTE_HIGH, pos, SKIPPED, 0, 0
    return OK, pos + length, SKIPPED, 0, 0


@njit(cache=True)
def _meta_event(data, pos, denominator_ok):
    """An FF event; rows for set_tempo (a: tempo) and text/copyright (a, b: where the text lies)."""
    if pos >= len(data):
        return PAST_EOF, pos, SKIPPED, 0, 0
    meta_type = data[pos]
    status, length, pos = _read_length(data, pos + 1)
    if status != OK:
        return status, pos, SKIPPED, 0, 0
    if not _mido_decodes_meta(data, pos, meta_type, length, denominator_ok):
        return BAD_META, pos, SKIPPED, 0, 0
    if meta_type == SET_TEMPO:
        return OK, pos + length, TEMPO, _u16(data, pos) << 8 | data[pos + 2], 0
    if meta_type == TEXT_META or meta_type == COPYRIGHT_META:
        return OK, pos + length, TEXT, pos, length  # decoded in Python from the bytes
    return OK, pos + length, SKIPPED, 0, 0


@njit(cache=True)
def _mido_decodes_meta(data, pos, meta_type, length, denominator_ok):
    """Whether mido's decoder for this meta type accepts the payload (it raises otherwise)."""
    if meta_type == SEQUENCE_NUMBER:
        return length != 1  # 0 bytes reads as 0; 1 byte is an IndexError
    if meta_type == CHANNEL_PREFIX:
        return length >= 1
    if meta_type == SET_TEMPO:
        return length >= 3
    if meta_type == SMPTE_OFFSET:  # frame rate code 0-3, minutes and seconds < 60, sub-frames < 100
        return (length >= 5 and data[pos] >> 5 <= 3 and data[pos + 1] <= 59
                and data[pos + 2] <= 59 and data[pos + 4] <= 99)
    if meta_type == TIME_SIGNATURE:
        return length >= 4 and denominator_ok[data[pos + 1]]
    if meta_type == KEY_SIGNATURE:  # sharps/flats -7..7 (signed byte), major or minor
        return length >= 2 and (data[pos] <= 7 or data[pos] >= 249) and data[pos + 1] <= 1
    return True
