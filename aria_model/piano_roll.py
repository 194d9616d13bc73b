"""Piano-roll pictures of a prompt and its generated continuation (matplotlib, no display needed).

    figure = piano_roll(sample.prompt, sample.continuation, sample.prompt_end_ms, title="0.mid")
    figure.savefig("0.png")
"""

from __future__ import annotations

import numpy as np
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from aria_model.midi import Performance

PROMPT_COLOUR = "#4c72b0"
CONTINUATION_COLOUR = "#dd8452"


def piano_roll(prompt: Performance, continuation: Performance, prompt_end_ms: float, title: str = "") -> Figure:
    """One bar per note (time in seconds against MIDI pitch), the prompt's notes and the generated
    ones in two colours, a dashed line where the prompt was cut. Darker bars are louder notes.

    A bare ``Figure`` renders with Agg and never touches pyplot's global state, so it is safe in
    Dagster step processes and threads without a display.
    """
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for perf, colour, label in ((prompt, PROMPT_COLOUR, "prompt"), (continuation, CONTINUATION_COLOUR, "generated")):
        if not perf.n_notes:
            continue
        onset_s = perf.onset_ms(remove_preceding_silence=False) / 1e3
        duration_s = perf.duration_ms() / 1e3
        colours = np.tile(to_rgba(colour), (perf.n_notes, 1))
        colours[:, 3] = 0.35 + 0.65 * perf.velocity / 127
        axes.barh(perf.pitch, duration_s, left=onset_s, height=0.8, color=colours, label=label)
    axes.axvline(prompt_end_ms / 1e3, color="black", linestyle="--", linewidth=1, label="prompt end")
    axes.set_xlabel("time (s)")
    axes.set_ylabel("MIDI pitch")
    axes.set_title(title)
    axes.grid(alpha=0.2)
    axes.legend(fontsize="small", loc="upper right")
    return figure

