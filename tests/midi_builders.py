"""Tiny hand-built MIDI files for tests (1 tick = 1 ms unless told otherwise)."""

from __future__ import annotations

import io

import mido

MS_TICKS_PER_BEAT = 500  # with tempo 500000 us/beat, one tick is one millisecond


def midi_bytes(tracks: list[list[mido.Message]], ticks_per_beat: int = MS_TICKS_PER_BEAT, type_: int = 1) -> bytes:
    """Serialise tracks of messages whose ``time`` is ABSOLUTE ticks (converted to deltas here)."""
    midi = mido.MidiFile(type=type_, ticks_per_beat=ticks_per_beat)
    for messages in tracks:
        track = mido.MidiTrack()
        previous = 0
        for msg in sorted(messages, key=lambda m: m.time):
            track.append(msg.copy(time=msg.time - previous))
            previous = msg.time
        midi.tracks.append(track)
    out = io.BytesIO()
    midi.save(file=out)
    return out.getvalue()


def note(pitch: int, start: int, end: int, velocity: int = 80, channel: int = 0) -> list[mido.Message]:
    return [
        mido.Message("note_on", note=pitch, velocity=velocity, channel=channel, time=start),
        mido.Message("note_off", note=pitch, velocity=0, channel=channel, time=end),
    ]


def notes_file(spec: list[tuple[int, int, int]], velocity: int = 80, extra: list[mido.Message] = ()) -> bytes:
    """A one-track file of (pitch, start_ms, end_ms) notes plus extra messages."""
    messages = [mido.MetaMessage("set_tempo", tempo=500_000, time=0), *extra]
    for pitch, start, end in spec:
        messages += note(pitch, start, end, velocity)
    return midi_bytes([messages])
