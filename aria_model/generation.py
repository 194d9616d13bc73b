"""Continue a piano performance with the Aria LM, as Aria's ``aria generate`` does.

- **Prompt** (Aria's ``get_inference_prompt``): the notes that start within the first
  ``prompt_seconds`` of the file (15 s), tokenized without ``<D>`` and ``<E>``; a file with no
  such note gives ``[("prefix", "instrument", "piano"), <S>]``. Pedal: see ``prompt_performance``.
- **Sampling** (Aria's ``sample_batch``): softmax of logits / temperature (0.98), then min-p
  (0.035: keep tokens with p >= min_p * p_max, renormalise) or, when ``top_p`` is set, top-p
  instead; temperature 0 is greedy. ``variations`` rows continue one prompt; new tokens =
  min(max_seq_len - prompt length, ``length``). A row that emits ``<E>`` is finished: it gets
  ``<P>`` from then on and its sample ends at the ``<E>``. ``force_end`` (Aria's ``--end``): in the
  last 130 positions, the first sampled token that is neither an onset nor a duration is replaced
  by ``<D>``, which the model learnt to read as "the piece ends about 100 tokens from here".
- **Decoding**: the prompt is prefilled once into a static KV cache, then one token per step
  (``aria_model.kv_cache``). The cache is bf16 on GPU and fp32 elsewhere unless told.
  ``compile=True`` wraps that one-token step in ``torch.compile(mode="reduce-overhead")``:
  on CUDA it runs as a CUDA graph, which is why every step has the same shapes (the cache is
  static and the position a tensor). ``use_cache=False`` is the reference: the whole sequence
  through the model at every step (tests and the benchmark's baseline).
- **Outputs**: ids -> tokens -> ``Performance`` (``detokenize``), MIDI files (``save_midi``), a
  piano roll per sample (``aria_model.piano_roll``) and a tempo-drift measure (``tempo_drift``).

    tokenizer = AbsTokenizer()
    model = load_generator(find_weights(home, "pretrain-tiny"), device="cuda")
    config = GenerationConfig(variations=4, force_end=True, compile=True)
    samples = generate(model, tokenizer, load_midi("prompt.mid"), config, seed=0)
    paths = write_samples(samples, Path("out"))   # out/0.mid, out/0.png, ...

Results depend only on the seed (and the device: GPU kernels round differently from CPU ones).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from aria_model.atomic_io import partial_path, write_bytes_atomic
from aria_model.embedding import load_model
from aria_model.kv_cache import KVCache
from aria_model.midi import DRUM_CHANNEL, Performance, pedal_intervals, save_midi
from aria_model.model import TransformerLM
from aria_model.note_tokenizer import BOS, DIM, EOS, PAD, TIME, Token
from aria_model.piano_roll import piano_roll
from aria_model.tempo import elapsed_ms
from aria_model.tokenizer import AbsTokenizer

FORCE_END_WINDOW = 130  # Aria's --end: <D> goes into the last this-many positions
CACHE_BUCKET = 512  # cache lengths are rounded up to this, so prompts of similar length share a compiled graph
CHORD_MS = 40  # onsets closer than this are one event (a chord, maybe rolled) for the drift measure
GRID_TOLERANCE = 0.125  # an onset within this fraction of the grid spacing of a grid line is "on the grid"


@dataclass(frozen=True)
class GenerationConfig:
    """What ``generate`` does; the defaults are Aria's ``aria generate`` defaults."""

    prompt_seconds: float = 15.0  # Aria's --prompt_duration: notes starting later are not in the prompt
    length: int = 2048  # new tokens asked for (Aria's --length); fewer when max_seq_len leaves less room
    variations: int = 4  # rows continuing the same prompt
    temperature: float = 0.98  # 0: greedy
    min_p: float = 0.035  # keep tokens with p >= min_p * p_max
    top_p: float | None = None  # nucleus sampling instead of min-p (Aria allows 0.5..1)
    force_end: bool = False  # Aria's --end: force <D> so the piece ends about 100 tokens later
    max_seq_len: int | None = None  # prompt + new tokens; None: the model's (8192 for medium)
    use_cache: bool = True  # False: the reference path, a full forward per token
    compile: bool = False  # torch.compile the one-token step (CUDA graphs on GPU)
    compile_backend: str = "inductor"  # "eager" checks graph capture without compiling kernels
    cache_dtype: torch.dtype | None = None  # None: bf16 on CUDA (Aria's), fp32 elsewhere

    def __post_init__(self):
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature {self.temperature} is outside Aria's 0..2")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p {self.min_p} is outside 0..1")
        if self.top_p is not None and not 0.5 <= self.top_p <= 1.0:
            raise ValueError(f"top_p {self.top_p} is outside Aria's 0.5..1")
        if self.length < 1 or self.variations < 1:
            raise ValueError("length and variations must be at least 1")
        if self.prompt_seconds < 0:
            raise ValueError(f"prompt_seconds {self.prompt_seconds} is negative")


# -- the prompt --------------------------------------------------------------------------------


def prompt_performance(perf: Performance, seconds: float) -> Performance:
    """The notes of ``perf`` that start at most ``seconds`` after tick 0, with the pedal up to then.

    Aria cuts its ``MidiDict`` (raw note ends plus pedal messages), keeps the pedal messages
    before the cut except a trailing pedal-down, and folds the pedal into the note ends when it
    tokenizes. ``load_midi`` has already folded the pedal of the whole file into ``end_tick``, so
    the equivalent here undoes the part of that folding that comes from pedalling Aria's prompt
    does not have:

    - a pedal interval released by the cut is kept, and so is what it did to note ends;
    - a pedal interval still down at the cut, or pressed after it, is dropped (its pedal events
      leave the prompt). A note it held now ends at ``max(pedal down, cut)``: the pedal held it
      up to the cut and not after, and a note held by a pedal pressed after the cut was still
      sounding when the pedal went down. Aria would end such a note at its key release, which
      ``load_midi`` does not keep; the release lies somewhere between the pedal down and the
      pedal up, so this differs from Aria only in a held note's length, never in which notes
      the prompt has.

    Metadata, tempo map and instrument classes stay whole, so the prefix tokens are the file's.
    """
    cut_ms = round(seconds * 1000)
    keep = perf.onset_ms(remove_preceding_silence=False) <= cut_ms
    end = perf.end_tick.copy()
    keep_pedal = np.ones(len(perf.pedal_tick), bool)
    if len(perf.pedal_tick) and perf.n_notes:
        cut_tick = _last_tick_within(perf, cut_ms)
        keep_pedal = perf.pedal_tick <= cut_tick
        table = np.stack([perf.pedal_tick, perf.pedal_channel, perf.pedal_down], axis=1).astype(np.int64)
        # load_midi closed a pedal left down at the raw end of the last note; end_tick[-1] is that
        # end unless the last note was itself pedalled, which moves only such a file's last interval.
        for channel, intervals in pedal_intervals(table, int(perf.end_tick[-1])).items():
            if channel == DRUM_CHANNEL:  # load_midi never pedals drums
                continue
            for down, up in intervals[intervals[:, 1] > cut_tick].tolist():
                held = (perf.channel == channel) & (perf.end_tick == up) & (perf.start_tick < up)
                end[held] = max(down, cut_tick)
                keep_pedal &= ~((perf.pedal_channel == channel) & (perf.pedal_tick >= down))
    notes = np.nonzero(keep)[0]
    return dataclasses.replace(
        perf, start_tick=perf.start_tick[notes], end_tick=end[notes], pitch=perf.pitch[notes],
        velocity=perf.velocity[notes], channel=perf.channel[notes], instrument=perf.instrument[notes],
        pedal_tick=perf.pedal_tick[keep_pedal], pedal_channel=perf.pedal_channel[keep_pedal],
        pedal_down=perf.pedal_down[keep_pedal])


def _last_tick_within(perf: Performance, ms: int) -> int:
    """The last tick at most ``ms`` after tick 0 (bisection: tick -> ms rounds and has Aria's quirks)."""
    def at(tick: int) -> int:
        return int(elapsed_ms(0, np.array([tick]), perf.tempo_tick, perf.tempo_us, perf.ticks_per_beat)[0])

    low, high = 0, int(max(perf.end_tick.max(), perf.pedal_tick.max())) + 1
    if at(high) <= ms:
        return high
    while high - low > 1:  # at(low) <= ms < at(high)
        middle = (low + high) // 2
        low, high = (middle, high) if at(middle) <= ms else (low, middle)
    return low


def prompt_ids(perf: Performance, tokenizer: AbsTokenizer, seconds: float) -> np.ndarray:
    """Aria's prompt for ``perf`` (int64 ids): its first ``seconds``, no ``<D>``, no ``<E>``."""
    prompt = prompt_performance(perf, seconds)
    if not prompt.n_notes:
        return np.array([tokenizer.tok_to_id[("prefix", "instrument", "piano")], BOS], np.int64)
    return tokenizer.tokenize_ids(prompt, add_dim_tok=False, add_eos_tok=False).astype(np.int64)


# -- sampling ----------------------------------------------------------------------------------


def min_p_filter(probs: torch.Tensor, min_p: float) -> torch.Tensor:
    """``probs`` with every token below ``min_p`` times the row's largest probability zeroed, renormalised."""
    kept = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` cut to the most likely tokens whose mass before each is within ``top_p``, renormalised.

    The most likely token always stays (nothing comes before it).
    """
    ordered, order = probs.sort(dim=-1, descending=True)
    drop_ordered = ordered.cumsum(dim=-1) - ordered > top_p
    drop = torch.zeros_like(drop_ordered).scatter(-1, order, drop_ordered)
    kept = probs.masked_fill(drop, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def sample_next(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``logits`` [B, V]: greedy at temperature 0, else temperature then min-p or top-p."""
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / config.temperature, dim=-1)
    probs = top_p_filter(probs, config.top_p) if config.top_p is not None else min_p_filter(probs, config.min_p)
    # The exponential race: argmax of p_i / E_i (E_i ~ Exp(1)) is token i with probability p_i, and
    # costs a few elementwise passes where torch.multinomial is several times slower on a CPU.
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(dim=-1)


# -- decoding ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationTiming:
    """Wall-clock of one batch: ``token_s[i]`` is when new token i of every row was chosen,
    counted from the start of the prefill (each step waits for the device, so these are real)."""

    prompt_tokens: int
    batch: int
    token_s: tuple[float, ...]

    @property
    def steps(self) -> int:
        return len(self.token_s)

    @property
    def first_token_s(self) -> float:
        """Prefill plus the first sampled token."""
        return self.token_s[0] if self.token_s else math.nan

    @property
    def decode_s(self) -> float:
        """The one-token steps after the first token."""
        return self.token_s[-1] - self.token_s[0] if self.token_s else 0.0

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.decode_s / (self.steps - 1) if self.steps > 1 else math.nan

    @property
    def tokens_per_s(self) -> float:
        """Decoded tokens per second over all rows (the prefill excluded)."""
        return self.batch * (self.steps - 1) / self.decode_s if self.decode_s > 0 else math.nan


def next_token_logits(model: TransformerLM, ids: torch.Tensor, cache: KVCache | None = None,
                      start_pos: int | torch.Tensor = 0) -> torch.Tensor:
    """fp32 logits [B, V] after the last of ``ids``. The head runs on that position only: over
    every position it would be a vocabulary-wide matmul per token for nothing."""
    hidden = model.model(ids, cache=cache, start_pos=start_pos)[:, -1]
    return model.lm_head(hidden).float()


@cache
def _compiled_step(backend: str):
    # One compiled function per process: dynamo keeps its graphs across generate calls.
    mode = {"mode": "reduce-overhead"} if backend == "inductor" else {}
    return torch.compile(next_token_logits, backend=backend, fullgraph=True, **mode)


_held_cache: tuple[tuple, KVCache] | None = None


def _new_cache(model: TransformerLM, batch: int, length: int, config: GenerationConfig) -> KVCache:
    device = model.lm_head.weight.device
    dtype = config.cache_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    length = min(-(-length // CACHE_BUCKET) * CACHE_BUCKET, model.config.max_seq_len)
    if not config.compile:
        return model.new_cache(batch, length, dtype)
    # A CUDA graph replays fixed addresses: the compiled step keeps reusing one cache (marked
    # static) rather than capturing a new graph for every call. Stale slots are harmless.
    global _held_cache
    key = (id(model), batch, length, dtype, device)
    if _held_cache is None or _held_cache[0] != key:
        _held_cache = None  # free the old buffers before allocating the new ones
        cache_ = model.new_cache(batch, length, dtype)
        for buffer in (*cache_.k, *cache_.v, cache_.key_positions):
            torch._dynamo.mark_static_address(buffer)
        _held_cache = (key, cache_)
    return _held_cache[1]


def sample_batch(model: TransformerLM, tokenizer: AbsTokenizer, prompt: np.ndarray, config: GenerationConfig,
                 generator: torch.Generator | None = None, progress: bool = False) -> tuple[torch.Tensor, GenerationTiming]:
    """``config.variations`` continuations of ``prompt`` (ids): [B, prompt + steps] ids, pads after
    a row's ``<E>``, and the timing. Stops early once every row has ended."""
    device = model.lm_head.weight.device
    max_seq_len = config.max_seq_len or model.config.max_seq_len
    n_prompt = len(prompt)
    n_new = min(max_seq_len - n_prompt, config.length)
    if n_new < 1:
        raise ValueError(f"a prompt of {n_prompt} tokens leaves no room under max_seq_len {max_seq_len}")
    if config.force_end and n_new <= FORCE_END_WINDOW:
        raise ValueError(f"force_end needs more than {FORCE_END_WINDOW} new tokens; {n_new} fit after the prompt")
    total = n_prompt + n_new
    batch = config.variations
    completes_note = torch.tensor([_completes_note(token, tokenizer) for token in tokenizer.vocab], device=device)

    with torch.inference_mode():
        seq = torch.full((batch, total), PAD, dtype=torch.long, device=device)
        seq[:, :n_prompt] = torch.as_tensor(prompt, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        dim_seen = torch.zeros(batch, dtype=torch.bool, device=device)
        start = time.perf_counter()
        if config.use_cache:
            kv = _new_cache(model, batch, total, config)
            logits = next_token_logits(model, seq[:, :n_prompt], kv, 0)
            step = _compiled_step(config.compile_backend) if config.compile else next_token_logits
            # Views of it carry the position: no host-to-device copy per step.
            positions = torch.arange(kv.max_seq_len, device=device)
        else:
            logits = next_token_logits(model, seq[:, :n_prompt])
        token_s = []
        for t in tqdm(range(n_prompt, total), desc="decoding", unit="tok", leave=False, disable=not progress):
            token = sample_next(logits, config, generator)
            token = torch.where(finished, PAD, token)
            if config.force_end and t >= total - FORCE_END_WINDOW:
                token = torch.where(~finished & ~dim_seen & ~completes_note[token], DIM, token)
            dim_seen |= token == DIM
            finished |= token == EOS
            seq[:, t] = token
            done = bool(finished.all())  # waits for the device, so the timestamp is real
            token_s.append(time.perf_counter() - start)
            if done or t + 1 == total:
                break
            if not config.use_cache:
                logits = next_token_logits(model, seq[:, : t + 1])
            else:
                if config.compile:
                    torch.compiler.cudagraph_mark_step_begin()  # the last logits are consumed: the graph may reuse them
                # A [B, 1] tensor of its own: a view of seq would have seq's length in its strides,
                # and a compiled step would recompile for every prompt length.
                logits = step(model, token[:, None], kv, positions[t])
    return seq[:, : n_prompt + len(token_s)], GenerationTiming(n_prompt, batch, tuple(token_s))


def _completes_note(token: Token, tokenizer: AbsTokenizer) -> bool:
    """Aria's test for where ``<D>`` must not go: before an onset or a duration token."""
    return isinstance(token, tuple) and token[0] in ("dur", tokenizer.time_family)


# -- samples -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TempoDrift:
    """How far a continuation's pace and pulse moved from its prompt's (see ``tempo_drift``)."""

    prompt_ioi_ms: float  # median inter-onset interval of the prompt
    continuation_ioi_ms: float  # the same for the generated notes
    ioi_ratio: float  # continuation / prompt: 1 keeps the pace, > 1 slower, < 1 faster
    grid_ms: float  # the prompt's grid spacing (its median inter-onset interval)
    prompt_on_grid: float  # fraction of the prompt's onsets on the grid (how metric the prompt is)
    continuation_on_grid: float  # the same for the generated onsets: drift pulls this to chance
    chance_on_grid: float = 2 * GRID_TOLERANCE  # what onsets at random times would score

    def row(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in dataclasses.asdict(self).items()}


def tempo_drift(prompt_onsets_ms: np.ndarray, continuation_onsets_ms: np.ndarray) -> TempoDrift:
    """Compare a continuation's inter-onset intervals and grid alignment with its prompt's.

    Onsets (ms, one clock for both) closer than ``CHORD_MS`` to the previous event are one event
    (a chord). The pace of a part is the median interval between its events; ``ioi_ratio`` is
    the continuation's over the prompt's. The prompt's dominant grid has that median as its
    spacing and is anchored at the prompt's last event, where the continuation takes over, and
    extended both ways. An event is on the grid when it lies within ``GRID_TOLERANCE`` of the
    spacing of a grid line; ``prompt_on_grid`` counts the prompt's events before the anchor,
    ``continuation_on_grid`` the generated ones. A continuation that keeps the prompt's tempo
    and pulse scores like the prompt; one that drifts loses phase, and the longer it runs the
    closer it gets to ``chance_on_grid`` (0.25). Values are NaN where a part has too few events.

    Example: a prompt every 250 ms continued every 250 ms gives ratio 1.0 and 1.0 on the grid;
    continued every 300 ms it gives ratio 1.2 and one event in five (0.2) on the grid.
    """
    prompt_events = _events(prompt_onsets_ms)
    continuation_events = _events(continuation_onsets_ms)
    prompt_ioi = float(np.median(np.diff(prompt_events))) if len(prompt_events) > 1 else math.nan
    continuation_ioi = float(np.median(np.diff(continuation_events))) if len(continuation_events) > 1 else math.nan
    anchor = prompt_events[-1] if len(prompt_events) else math.nan
    return TempoDrift(
        prompt_ioi_ms=prompt_ioi,
        continuation_ioi_ms=continuation_ioi,
        ioi_ratio=continuation_ioi / prompt_ioi,
        grid_ms=prompt_ioi,
        prompt_on_grid=_on_grid(prompt_events[:-1], anchor, prompt_ioi),
        continuation_on_grid=_on_grid(continuation_events, anchor, prompt_ioi),
    )


def _events(onsets_ms: np.ndarray) -> np.ndarray:
    onsets = np.unique(np.asarray(onsets_ms, np.float64))
    events: list[float] = []
    for onset in onsets.tolist():
        if not events or onset - events[-1] >= CHORD_MS:
            events.append(onset)
    return np.array(events)


def _on_grid(events: np.ndarray, anchor: float, spacing: float) -> float:
    if not len(events) or not spacing > 0:
        return math.nan
    beats = (events - anchor) / spacing
    return float(np.mean(np.abs(beats - np.round(beats)) <= GRID_TOLERANCE))


@dataclass(frozen=True)
class GeneratedSample:
    """One variation: its ids and tokens, the music they decode to, and how its tempo held.

    ``performance``, ``prompt`` and ``continuation`` share one clock (1 tick = 1 ms from the
    prompt's first note), so ``prompt_end_ms`` marks the cut on all three.
    """

    index: int
    ids: np.ndarray  # prompt + continuation, through <E> when the row ended
    tokens: list[Token]
    prompt_len: int
    finished: bool  # emitted <E>
    dim_index: int | None  # position of the first <D> after the prompt
    performance: Performance  # the whole sample: prompt notes and generated notes
    prompt: Performance
    continuation: Performance
    prompt_end_ms: float
    drift: TempoDrift
    timing: GenerationTiming

    @property
    def new_tokens(self) -> int:
        return len(self.ids) - self.prompt_len


def generate(model: TransformerLM, tokenizer: AbsTokenizer, prompt_perf: Performance, config: GenerationConfig,
             seed: int = 0, progress: bool = False) -> list[GeneratedSample]:
    """``config.variations`` continuations of ``prompt_perf``'s first ``config.prompt_seconds``;
    the same seed gives the same samples."""
    if not isinstance(model, TransformerLM):
        raise TypeError(f"generation needs a TransformerLM (a language-model head), not {type(model).__name__}")
    model.eval()
    cut = prompt_performance(prompt_perf, config.prompt_seconds)
    prompt = prompt_ids(prompt_perf, tokenizer, config.prompt_seconds)
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    batch, timing = sample_batch(model, tokenizer, prompt, config, generator, progress)
    # The decoded clock starts at the prompt's first note (or the first generated one).
    prompt_end_ms = round(config.prompt_seconds * 1000) - cut.onset_ms(False)[0] if cut.n_notes else 0
    prompt_notes = tokenizer.detokenize_ids(prompt)
    # The prompt body's <T> tokens alone keep the generated notes on the prompt's clock.
    body_start = int(np.nonzero(prompt == BOS)[0][0]) + 1
    clock = np.concatenate([prompt[:body_start], np.full(int(np.sum(prompt[body_start:] == TIME)), TIME)])
    samples = []
    for index, row in enumerate(batch.cpu().numpy()):
        new = row[len(prompt):]
        ended = np.nonzero(new == EOS)[0]
        if len(ended):
            new = new[: ended[0] + 1]
        ids = np.concatenate([prompt, new])
        dims = np.nonzero(new == DIM)[0]
        continuation = tokenizer.detokenize_ids(np.concatenate([clock, new]))
        samples.append(GeneratedSample(
            index=index, ids=ids, tokens=tokenizer.decode(ids), prompt_len=len(prompt), finished=bool(len(ended)),
            dim_index=int(len(prompt) + dims[0]) if len(dims) else None,
            performance=tokenizer.detokenize_ids(ids), prompt=prompt_notes, continuation=continuation,
            prompt_end_ms=float(prompt_end_ms), timing=timing,
            drift=tempo_drift(prompt_notes.onset_ms(False), continuation.onset_ms(False))))
    return samples


# -- files -------------------------------------------------------------------------------------


def write_samples(samples: list[GeneratedSample], folder: Path, title: str = "") -> list[tuple[Path, Path]]:
    """``<folder>/<index>.mid`` (prompt and continuation, as Aria's ``res_<i>.mid``) and
    ``<index>.png`` (the piano roll) per sample, each written atomically; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for sample in samples:
        midi_path, png_path = folder / f"{sample.index}.mid", folder / f"{sample.index}.png"
        partial = partial_path(midi_path)
        save_midi(sample.performance, partial)
        os.replace(partial, midi_path)
        figure = piano_roll(sample.prompt, sample.continuation, sample.prompt_end_ms,
                            title=f"{title} variation {sample.index}".strip())
        write_bytes_atomic(png_path, _png(figure))
        written.append((midi_path, png_path))
    return written


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


# -- models ------------------------------------------------------------------------------------


def find_weights(home: Path, run_name: str | None = None) -> Path:
    """``<home>/models/pretrain/<run_name>/model.pt``, or the newest such file when no run is named."""
    root = Path(home) / "models" / "pretrain"
    if run_name is not None:
        path = root / run_name / "model.pt"
        candidates = [path] if path.exists() else []
    else:
        candidates = sorted(root.glob("*/model.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        where = root / (run_name or "*") / "model.pt"
        raise FileNotFoundError(
            f"no pretrained model at {where}. Train one with `aria run pretrain --with-missing-upstream` "
            f"(or `python -m aria_model.training.pretrain --preset tiny`), or pass the path of a model.pt")
    return candidates[-1]


def load_generator(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> TransformerLM:
    """The language model in ``path`` (our ``model.pt``), in eval mode; bf16 by default on CUDA."""
    device = torch.device(device)
    if dtype is None and device.type == "cuda":
        dtype = torch.bfloat16
    model = load_model(path, device=device, dtype=dtype)
    if not isinstance(model, TransformerLM):
        raise ValueError(f"{path} holds an embedding model (contrastive step); generation needs a pretrained LM")
    return model
