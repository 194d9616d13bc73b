"""Ingest throughput: MIDI -> notes (``load_midi``) and notes -> ids (``AbsTokenizer.tokenize_ids``).

Every stage is timed next to the Aria-style reference implementation
(``tests/aria_reference.py``: per-message parsing, per-note tempo walk and
quantisation, as ariautils does it) in the same run, on one core and on all
cores (a multiprocessing Pool over files), and reports ours/reference. Parsing
is timed with both engines of ``load_midi``: "fast" (the compiled reader of
``aria_model.midi_fast``) and "mido"; mido's own parse (``mido.MidiFile``) is
timed as the floor any mido-based parser pays. Where installed
(``pip install -e .[bench]``), symusic's C++ parser and MidiTok's REMI
tokenizer (on symusic scores) run beside them as the fastest alternatives a
user could pick; their notes and tokens are not Aria's.

Corpora: the golden files, then the demo corpus (built once into
``--demo-dir`` from music21's bundled scores, ~2 min), then any ``--corpus``.

Files are read into memory first, so disk speed is not measured. Files that
either implementation rejects (e.g. no notes) are left out and counted.

    PYTHONPATH=. .venv/bin/python bench/ingest.py                      # golden files
    PYTHONPATH=. .venv/bin/python bench/ingest.py --corpus DIR --repeat 5
    PYTHONPATH=. .venv/bin/python bench/ingest.py --profile            # where load_midi spends time

Every worker holds the whole corpus parsed (ours and the reference's), so that
the tokenize stages time tokenizing only; use ``--max-files`` on big folders.

``--repeat N``: N timed passes over each corpus; one core reports the best pass,
the pool runs the N passes as one job (more tasks balance the cores better).
Targets per core, on every corpus: parse (fast engine) and tokenize >= 5M notes/s.
The fast reader's start-up (numba cache load, or compiling when there is no
cache yet) is timed once and left out of the passes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import multiprocessing as mp
import os
import pstats
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mido
import numba

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from aria_model.demo_corpus import DemoCorpusConfig, build_demo_corpus  # noqa: E402
from aria_model.home import default_home  # noqa: E402
from aria_model.midi import MidiError, load_midi  # noqa: E402
from aria_model.tokenizer import AbsTokenizer  # noqa: E402
from tests import aria_reference as aria  # noqa: E402

try:  # optional baselines: pip install -e .[bench]
    import miditok
    import symusic
except ImportError:
    symusic = miditok = None

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "golden" / "midi"
FALLBACK_CORPUS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "golden" / "midi"
TARGETS = {("parse", "fast"): 5e6, ("tokenize", "ours"): 5e6}  # notes/s on one core
TOKENIZER = AbsTokenizer()


# -- the stages: each takes one file's index and returns nothing worth keeping ----------
# Workers read the corpus from these globals (set before forking, or by the initializer).
_BLOBS: list[bytes] = []
_OURS_PARSED: list = []
_REFERENCE_PARSED: list = []
_SYMUSIC_PARSED: list = []
_REMI = miditok.REMI() if miditok else None


def mido_floor(i: int) -> None:
    mido.MidiFile(file=io.BytesIO(_BLOBS[i]))


def fast_parse(i: int) -> None:
    load_midi(_BLOBS[i], engine="fast")


def mido_parse(i: int) -> None:
    load_midi(_BLOBS[i], engine="mido")


def reference_parse(i: int) -> None:
    aria.reference_parse(_BLOBS[i])


def symusic_parse(i: int) -> None:
    symusic.Score.from_midi(_BLOBS[i])


def ours_tokenize(i: int) -> None:
    TOKENIZER.tokenize_ids(_OURS_PARSED[i], add_dim_tok=False)


def reference_tokenize(i: int) -> None:
    aria.encode(aria.tokens_from_parsed(_REFERENCE_PARSED[i]))


def miditok_tokenize(i: int) -> None:
    _REMI(_SYMUSIC_PARSED[i])


@dataclass(frozen=True, eq=False)
class Stage:
    step: str  # "parse" or "tokenize"
    label: str
    impl: str  # "fast" / "mido" (parse engines), "ours" (tokenize), "reference", "floor" or a baseline
    run: Callable[[int], None]


STAGES = (
    Stage("parse", "mido.MidiFile only", "floor", mido_floor),
    Stage("parse", "MIDI -> notes", "fast", fast_parse),
    Stage("parse", "MIDI -> notes", "mido", mido_parse),
    Stage("parse", "MIDI -> notes", "reference", reference_parse),
    *([Stage("parse", "MIDI -> Score (C++)", "symusic", symusic_parse)] if symusic else []),
    Stage("tokenize", "notes -> ids", "ours", ours_tokenize),
    Stage("tokenize", "notes -> ids", "reference", reference_tokenize),
    *([Stage("tokenize", "Score -> REMI ids", "miditok", miditok_tokenize)] if miditok else []),
)


def _load_corpus(blobs: list[bytes]) -> None:
    """Set a process's corpus and pre-parse it, so tokenize stages time tokenizing only."""
    global _BLOBS, _OURS_PARSED, _REFERENCE_PARSED, _SYMUSIC_PARSED
    _BLOBS = blobs
    _OURS_PARSED = [load_midi(b) for b in blobs]
    _REFERENCE_PARSED = [aria.reference_parse(b) for b in blobs]
    _SYMUSIC_PARSED = [symusic.Score.from_midi(b) for b in blobs] if symusic else []


# -- corpus ------------------------------------------------------------------------------


@dataclass
class Corpus:
    name: str
    blobs: list[bytes]
    notes: list[int]  # parsed notes per file, the unit of notes/s
    skipped: dict[str, int]
    fallbacks: int  # files the fast reader handed to mido (skipped ones included)

    @property
    def n_notes(self) -> int:
        return sum(self.notes)


def read_corpus(folder: Path, max_files: int | None = None) -> Corpus:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".mid", ".midi"))[:max_files]
    blobs, notes, skipped, fallbacks = [], [], {}, 0
    for path in paths:
        blob = path.read_bytes()
        reason, n_notes, parsed_by = _screen(blob)
        fallbacks += parsed_by == "mido-fallback"
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        blobs.append(blob)
        notes.append(n_notes)
    # Largest files first: the pool then finishes with small tasks and idles less.
    order = sorted(range(len(blobs)), key=lambda i: -notes[i])
    return Corpus(str(folder), [blobs[i] for i in order], [notes[i] for i in order], skipped, fallbacks)


def _screen(blob: bytes) -> tuple[str | None, int, str | None]:
    """(why the file is left out, or None; how many notes it parses to; which engine parsed it)."""
    try:
        perf = load_midi(blob)
    except MidiError as exc:
        return exc.reason, 0, exc.parsed_by
    return aria.reference_error(blob), perf.n_parsed_notes, perf.parsed_by


# -- timing ------------------------------------------------------------------------------


@dataclass
class Timing:
    seconds: float
    files: int
    notes: int

    @property
    def notes_per_s(self) -> float:
        return self.notes / self.seconds

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds


def time_one_core(corpus: Corpus, repeat: int) -> dict[Stage, Timing]:
    """Best pass per stage; stages take turns within each pass so that a change in
    machine load hits ours and the reference alike and their ratio stays fair."""
    indices = range(len(corpus.blobs))
    best = {stage: float("inf") for stage in STAGES}
    for stage in STAGES:  # warm-up: lazily built tables, caches
        for i in indices:
            stage.run(i)
    for _ in range(repeat):
        for stage in STAGES:
            start = time.perf_counter()
            for i in indices:
                stage.run(i)
            best[stage] = min(best[stage], time.perf_counter() - start)
    return {stage: Timing(seconds, len(indices), corpus.n_notes) for stage, seconds in best.items()}


def time_pool(stage: Stage, corpus: Corpus, repeat: int, pool: mp.pool.Pool, workers: int) -> Timing:
    tasks = [i for _ in range(repeat) for i in range(len(corpus.blobs))]
    pool.map(stage.run, range(len(corpus.blobs)), chunksize=1)  # warm-up every worker
    # A few chunks per worker: per-task IPC would otherwise dominate sub-ms stages.
    chunksize = max(1, len(tasks) // (4 * workers))
    start = time.perf_counter()
    pool.map(stage.run, tasks, chunksize=chunksize)
    return Timing(time.perf_counter() - start, len(tasks), corpus.n_notes * repeat)


# -- report ------------------------------------------------------------------------------

HEADER = (f"{'stage':<9} {'what':<19} {'impl':<9} | {'1 core files/s':>14} {'notes/s':>11} {'x ref':>6} |"
          f" {'pool files/s':>12} {'notes/s':>11} {'/core':>9} {'x ref':>6}")


def _row(stage: Stage, one: Timing, pooled: Timing, workers: int, ref: tuple[Timing, Timing] | None) -> str:
    ratio_one = f"{one.notes_per_s / ref[0].notes_per_s:5.1f}x" if ref else ""
    ratio_pool = f"{pooled.notes_per_s / ref[1].notes_per_s:5.1f}x" if ref else ""
    return (f"{stage.step:<9} {stage.label:<19} {stage.impl:<9} | {one.files_per_s:14,.1f} "
            f"{one.notes_per_s:11,.0f} {ratio_one:>6} | {pooled.files_per_s:12,.1f} "
            f"{pooled.notes_per_s:11,.0f} {pooled.notes_per_s / workers:9,.0f} {ratio_pool:>6}")


def bench_corpus(corpus: Corpus, repeat: int, workers: int) -> None:
    size_mb = sum(len(b) for b in corpus.blobs) / 1e6
    skipped = ", ".join(f"{n} {reason}" for reason, n in corpus.skipped.items()) or "none"
    print(f"\ncorpus {corpus.name}: {len(corpus.blobs)} files, {corpus.n_notes:,} notes, "
          f"{size_mb:.1f} MB (skipped: {skipped}); fast reader fell back to mido on {corpus.fallbacks}; "
          f"{repeat} passes; pool of {workers}")
    _load_corpus(corpus.blobs)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    one_core = time_one_core(corpus, repeat)
    results: dict[tuple[str, str], tuple[Timing, Timing]] = {}
    with ctx.Pool(workers, initializer=_load_corpus, initargs=(corpus.blobs,)) as pool:
        for stage in STAGES:
            pooled = time_pool(stage, corpus, repeat, pool, workers)
            results[stage.step, stage.impl] = (one_core[stage], pooled)
    print(HEADER)
    print("-" * len(HEADER))
    for stage in STAGES:
        ref = results.get((stage.step, "reference")) if stage.impl != "reference" else None
        print(_row(stage, *results[stage.step, stage.impl], workers, ref))
    _print_targets(results)


def _print_targets(results: dict) -> None:
    for (step, impl), target in TARGETS.items():
        one_core = results[step, impl][0].notes_per_s
        ratio = one_core / results[step, "reference"][0].notes_per_s
        verdict = "PASS" if one_core >= target else "MISSED"
        print(f"target {step:<8} {impl} per core >= {target / 1e6:.0f}M notes/s: {one_core:,.0f} notes/s "
              f"({ratio:.0f}x the reference)  {verdict}")


def profile_load_midi(corpus: Corpus, top: int = 25) -> None:
    """cProfile of our parse over the corpus, sorted by own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for blob in corpus.blobs:
        load_midi(blob)
    profiler.disable()
    print(f"\nload_midi profile on {corpus.name} ({corpus.n_notes:,} notes), by own time:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def fast_reader_startup() -> float:
    """Seconds of the first fast parse in this process (before any other)."""
    start = time.perf_counter()
    load_midi((FALLBACK_CORPUS / "basic.mid").read_bytes(), engine="fast")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, action="append", default=[],
                        help="extra folder of .mid/.midi files (repeatable); the golden files always run")
    parser.add_argument("--demo-dir", type=Path, default=default_home() / "bench" / "demo_corpus",
                        help="where the demo corpus is built once and reused (default: %(default)s)")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo corpus")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes per corpus (default 3)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="pool size (default: all cores)")
    parser.add_argument("--max-files", type=int, default=None,
                        help="use only the first N files of each corpus (every worker holds it parsed)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of load_midi")
    args = parser.parse_args(argv)
    golden = DEFAULT_CORPUS if DEFAULT_CORPUS.is_dir() else FALLBACK_CORPUS
    print(f"python {sys.version.split()[0]}, mido {mido.version_info}, numba {numba.__version__}, "
          f"{os.cpu_count()} cores")
    print(f"fast reader start-up (numba cache load, or compile without a cache): {fast_reader_startup():.2f} s")
    folders = [golden, *args.corpus]
    if not args.no_demo:
        report = build_demo_corpus(args.demo_dir, DemoCorpusConfig.preset("demo"))
        print(f"demo corpus: {report.selected} pieces in {args.demo_dir} ({report.converted} converted now)")
        folders.insert(1, args.demo_dir)
    for folder in folders:
        corpus = read_corpus(folder, args.max_files)
        bench_corpus(corpus, args.repeat, args.workers)
        if args.profile:
            profile_load_midi(corpus)


if __name__ == "__main__":
    main()
