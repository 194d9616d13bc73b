"""Generation: Aria's prompt cut, min-p / top-p / greedy sampling, <E> and --end rules, cached and
uncached decoding agreeing token for token, outputs that read back, tempo drift, the CLI and the asset."""

import dataclasses
import math

import dagster as dg
import mido
import numpy as np
import pytest
import torch
from torch import nn

from aria_model.generation import (
    FORCE_END_WINDOW,
    GenerationConfig,
    generate,
    min_p_filter,
    prompt_ids,
    prompt_performance,
    sample_batch,
    sample_next,
    tempo_drift,
    top_p_filter,
    write_samples,
)
from aria_model.midi import load_midi
from aria_model.model import ModelConfig, TransformerLM
from aria_model.note_tokenizer import BOS, DIM, EOS, PAD
from aria_model.tokenizer import AbsTokenizer
from tests.midi_builders import midi_bytes, note, notes_file

TOKENIZER = AbsTokenizer()
SMALL = ModelConfig(d_model=64, n_heads=2, n_layers=2, ffn_hidden=128, max_seq_len=512)


@pytest.fixture(scope="module")
def model() -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(SMALL).eval()


@pytest.fixture
def prompt_midi(tmp_path):
    """Four seconds of a scale, one note every 250 ms."""
    path = tmp_path / "scale.mid"
    path.write_bytes(notes_file([(60 + i % 12, 250 * i, 250 * i + 200) for i in range(16)]))
    return path


def save_model_pt(path, config: ModelConfig = SMALL) -> None:
    torch.manual_seed(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_config": config.to_dict(), "state_dict": TransformerLM(config).state_dict(), "step": 0}, path)


# -- the prompt ---------------------------------------------------------------------------------


def pedal(tick: int, down: bool) -> mido.Message:
    return mido.Message("control_change", control=64, value=127 if down else 0, channel=0, time=tick)


def test_prompt_keeps_notes_up_to_the_cut_and_the_pedal_only_up_to_it(tmp_path):
    # 1 tick = 1 ms; the cut is at 15 s.
    messages = [mido.MetaMessage("set_tempo", tempo=500_000, time=0)]
    messages += note(60, 0, 1000) + note(67, 2000, 2500)  # both held by a pedal released before the cut
    messages += [pedal(500, True), pedal(3000, False)]
    messages += note(62, 14000, 14500) + [pedal(14200, True), pedal(15100, False)]  # pedal down across the cut
    messages += note(64, 14800, 15300) + [pedal(15200, True), pedal(17000, False)]  # pedal pressed after the cut
    messages += note(65, 15500, 16000)  # starts after the cut
    perf = load_midi(midi_bytes([messages]))
    assert perf.end_tick.tolist() == [3000, 3000, 15100, 17000, 17000]  # load_midi folds the whole file's pedal

    prompt = prompt_performance(perf, 15.0)
    assert prompt.pitch.tolist() == [60, 67, 62, 64]
    # Released before the cut: kept. Down at the cut: held up to the cut. Pressed after: held to its down.
    assert prompt.end_tick.tolist() == [3000, 3000, 15000, 15200]
    assert prompt.pedal_tick.tolist() == [500, 3000] and prompt.pedal_down.tolist() == [True, False]
    assert perf.end_tick.tolist() == [3000, 3000, 15100, 17000, 17000]  # the input is left alone

    ids = prompt_ids(perf, TOKENIZER, 15.0)
    assert ids.tolist() == TOKENIZER.tokenize_ids(prompt, add_dim_tok=False, add_eos_tok=False).tolist()


def test_prompt_has_no_dim_or_eos_and_an_empty_prompt_is_piano_and_bos():
    long_piece = load_midi(notes_file([(60 + i % 12, 70 * i, 70 * i + 60) for i in range(300)]))
    ids = prompt_ids(long_piece, TOKENIZER, 15.0)
    assert len(ids) > TOKENIZER.config.dim_min_body and DIM not in ids and EOS not in ids
    assert len(ids) == 2 + 3 * 215 + 2  # prefix, <S>, notes at 0..14980 ms, two <T>

    late = load_midi(notes_file([(60, 16_000, 16_500)]))
    piano = TOKENIZER.tok_to_id[("prefix", "instrument", "piano")]
    assert prompt_ids(late, TOKENIZER, 15.0).tolist() == [piano, BOS]
    assert prompt_performance(late, 15.0).n_notes == 0


def test_generation_from_an_empty_prompt(model):
    late = load_midi(notes_file([(60, 16_000, 16_500)]))
    (sample,) = generate(model, TOKENIZER, late, GenerationConfig(length=20, variations=1), seed=0)
    assert sample.prompt_len == 2 and sample.prompt_end_ms == 0 and sample.prompt.n_notes == 0


# -- sampling -----------------------------------------------------------------------------------


def test_min_p_keeps_tokens_above_a_fraction_of_the_most_likely():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]])
    # min_p 0.1: threshold 0.05, so 0.04 goes and the rest share its mass.
    expected = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.0]]) / 0.96
    assert torch.allclose(min_p_filter(probs, 0.1), expected)
    assert torch.allclose(min_p_filter(probs, 0.0), probs)


def test_top_p_keeps_the_smallest_head_within_the_mass():
    probs = torch.tensor([[0.1, 0.5, 0.04, 0.3, 0.06]])
    # Sorted 0.5, 0.3, 0.1, ...: the mass before 0.1 is 0.8 > 0.75, so only 0.5 and 0.3 stay.
    expected = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.0]]) / 0.8
    assert torch.allclose(top_p_filter(probs, 0.75), expected)


def test_temperature_zero_is_argmax_and_sampling_follows_the_filtered_distribution():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next(logits, GenerationConfig(temperature=0), None), logits.argmax(-1))

    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    logits = probs.log().expand(20_000, 5)
    drawn = sample_next(logits, GenerationConfig(temperature=1.0, min_p=0.1), torch.Generator().manual_seed(0))
    frequencies = torch.bincount(drawn, minlength=5) / len(drawn)
    assert frequencies[4] == 0
    assert torch.allclose(frequencies[:4], probs[:4] / 0.96, atol=0.015)


def test_same_seed_same_samples_other_seed_other_samples(model, prompt_midi):
    perf = load_midi(prompt_midi)
    config = GenerationConfig(length=40, variations=2)
    first, again = generate(model, TOKENIZER, perf, config, seed=3), generate(model, TOKENIZER, perf, config, seed=3)
    assert all(np.array_equal(a.ids, b.ids) for a, b in zip(first, again))
    other = generate(model, TOKENIZER, perf, config, seed=4)
    assert not all(np.array_equal(a.ids, b.ids) for a, b in zip(first, other))
    assert not np.array_equal(first[0].ids, first[1].ids)  # variations differ


# -- decoding -----------------------------------------------------------------------------------


def test_cached_greedy_generation_equals_a_full_forward_per_token(model, prompt_midi):
    perf = load_midi(prompt_midi)
    config = GenerationConfig(length=60, variations=2, temperature=0)
    cached = generate(model, TOKENIZER, perf, config, seed=0)
    uncached = generate(model, TOKENIZER, perf, dataclasses.replace(config, use_cache=False), seed=0)
    assert [s.new_tokens for s in cached] == [60, 60]
    for a, b in zip(cached, uncached):
        assert np.array_equal(a.ids, b.ids)


def test_compiled_decode_step_equals_eager(model, prompt_midi):
    """The GPU path (static cache, compiled one-token step) captured in one graph; "eager" skips
    kernel compilation so this stays fast on a CPU."""
    perf = load_midi(prompt_midi)
    config = GenerationConfig(length=30, variations=2, temperature=0)
    eager = generate(model, TOKENIZER, perf, config, seed=0)
    compiled = generate(model, TOKENIZER, perf, dataclasses.replace(config, compile=True, compile_backend="eager"),
                        seed=0)
    for a, b in zip(eager, compiled):
        assert np.array_equal(a.ids, b.ids)


class ScriptedTrunk(nn.Module):
    """Stands in for the transformer: the "hidden state" of a position is (token, position, row)."""

    def forward(self, ids, cache=None, start_pos=0):
        batch, length = ids.shape
        positions = (start_pos + torch.arange(length)).float().expand(batch, length)
        rows = torch.arange(batch).float()[:, None].expand(batch, length)
        return torch.stack([ids.float(), positions, rows], dim=-1)


class ScriptedHead(nn.Module):
    """Turns (token, position, row) into logits that pick ``rule(token, position, row)``."""

    def __init__(self, rule):
        super().__init__()
        self.rule = rule
        self.weight = nn.Parameter(torch.zeros(1))  # new_cache takes dtype and device from it

    def forward(self, hidden):
        logits = torch.full((hidden.shape[0], TOKENIZER.vocab_size), -1e4)
        for row, (token, position, index) in enumerate(hidden.long().tolist()):
            logits[row, self.rule(token, position, index)] = 0.0
        return logits


def scripted_model(rule) -> TransformerLM:
    model = TransformerLM(SMALL)
    model.model, model.lm_head = ScriptedTrunk(), ScriptedHead(rule)
    return model


LAYOUT = TOKENIZER.layout
DURATION = TOKENIZER.tok_to_id[("dur", 100)]


def is_note(token: int) -> bool:
    return LAYOUT.note <= token < LAYOUT.drum


def note_cycle(token: int, position: int, row: int) -> int:
    """note -> onset -> duration -> note ...: changing pitches, onsets from 4 s on (after the test prompt)."""
    if is_note(token):
        return TOKENIZER.tok_to_id[("onset", 4000 + 10 * (position % 90))]
    if token >= LAYOUT.onset:
        return DURATION
    return TOKENIZER.tok_to_id[("piano", 48 + position % 24, 80)]


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_row_that_emits_eos_ends_and_is_padded(prompt_midi, use_cache):
    perf = load_midi(prompt_midi)
    n_prompt = len(prompt_ids(perf, TOKENIZER, 15.0))
    ends_at = n_prompt + 10

    def rule(token, position, row):
        return EOS if row == 0 and position + 1 == ends_at else note_cycle(token, position, row)

    model = scripted_model(rule)
    config = GenerationConfig(length=40, variations=2, temperature=0, use_cache=use_cache)
    batch, timing = sample_batch(model, TOKENIZER, prompt_ids(perf, TOKENIZER, 15.0), config)
    assert batch[0, ends_at] == EOS and (batch[0, ends_at + 1 :] == PAD).all()
    assert not ((batch[1] == EOS) | (batch[1] == PAD)).any() and timing.steps == 40

    first, second = generate(model, TOKENIZER, perf, config, seed=0)
    assert first.finished and first.ids[-1] == EOS and len(first.ids) == ends_at + 1
    assert not second.finished and second.new_tokens == 40


def test_all_rows_ending_stops_decoding(prompt_midi):
    perf = load_midi(prompt_midi)
    n_prompt = len(prompt_ids(perf, TOKENIZER, 15.0))
    model = scripted_model(lambda token, position, row: EOS if position + 1 == n_prompt + 5 else DURATION)
    batch, timing = sample_batch(model, TOKENIZER, prompt_ids(perf, TOKENIZER, 15.0),
                                 GenerationConfig(length=100, variations=3, temperature=0))
    assert timing.steps == 6 and batch.shape == (3, n_prompt + 6)


def test_force_end_puts_dim_before_the_first_note_of_the_last_130_tokens(prompt_midi):
    perf = load_midi(prompt_midi)
    prompt = prompt_ids(perf, TOKENIZER, 15.0)
    config = GenerationConfig(length=200, variations=1, temperature=0, force_end=True)
    batch, _ = sample_batch(scripted_model(note_cycle), TOKENIZER, prompt, config)
    row = batch[0].tolist()
    total = len(prompt) + 200
    (at,) = [i for i, token in enumerate(row) if token == DIM]
    assert at >= total - FORCE_END_WINDOW
    # The first position in the window where the model chose a note (not an onset or a duration
    # that completes the note before) became <D>; the model carried on with a note after it.
    first_note = next(i for i in range(total - FORCE_END_WINDOW, total) if row[i - 1] == DURATION)
    assert at == first_note and row[at - 1] == DURATION and is_note(row[at + 1])
    # Without --end nothing is forced.
    plain, _ = sample_batch(scripted_model(note_cycle), TOKENIZER, prompt, dataclasses.replace(config, force_end=False))
    assert DIM not in plain[0].tolist()

    with pytest.raises(ValueError, match="force_end needs more than 130"):
        sample_batch(scripted_model(note_cycle), TOKENIZER, prompt, dataclasses.replace(config, length=100))


def test_new_tokens_are_capped_by_max_seq_len(model, prompt_midi):
    perf = load_midi(prompt_midi)
    n_prompt = len(prompt_ids(perf, TOKENIZER, 15.0))
    (sample,) = generate(model, TOKENIZER, perf, GenerationConfig(length=2048, variations=1,
                                                                   max_seq_len=n_prompt + 25), seed=0)
    assert sample.new_tokens <= 25
    with pytest.raises(ValueError, match="leaves no room"):
        generate(model, TOKENIZER, perf, GenerationConfig(max_seq_len=n_prompt), seed=0)


# -- outputs ------------------------------------------------------------------------------------


def test_samples_decode_to_midi_that_reads_back(prompt_midi, tmp_path):
    perf = load_midi(prompt_midi)
    model = scripted_model(note_cycle)  # writes real notes, so the files have a continuation
    samples = generate(model, TOKENIZER, perf, GenerationConfig(length=60, variations=2), seed=0)
    for sample, (midi, png) in zip(samples, write_samples(samples, tmp_path / "out", title="scale")):
        assert png.read_bytes().startswith(b"\x89PNG")
        back = load_midi(midi)
        assert back.n_notes == sample.performance.n_notes == sample.prompt.n_notes + sample.continuation.n_notes
        assert sample.prompt.n_notes == 16 and sample.continuation.n_notes == 20
        # The generated notes sit on the prompt's clock: after its last note, and in the file.
        assert sample.continuation.start_tick.min() >= sample.prompt.start_tick.max()
        assert sorted(back.pitch.tolist()) == sorted(sample.performance.pitch.tolist())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.mid", "0.png", "1.mid", "1.png"]


def test_tempo_drift_on_continuations_of_known_drift():
    beats = 250 * np.arange(60)  # a prompt every 250 ms up to 14.75 s ...
    prompt = np.concatenate([beats, beats + 10])  # ... in two-note chords
    steady = tempo_drift(prompt, 14_750 + 250 * np.arange(1, 41))
    assert steady.ioi_ratio == 1.0 and steady.continuation_on_grid == 1.0 and steady.prompt_on_grid == 1.0
    assert steady.grid_ms == 250.0
    # 20% slower: every fifth onset falls back on the grid (300 ms x 5 = 250 ms x 6).
    slower = tempo_drift(prompt, 14_750 + 300 * np.arange(1, 41))
    assert slower.ioi_ratio == pytest.approx(1.2) and slower.continuation_on_grid == pytest.approx(0.2)
    assert slower.chance_on_grid == 0.25
    nothing = tempo_drift(prompt, np.array([15_000]))
    assert math.isnan(nothing.ioi_ratio) and nothing.continuation_on_grid == 1.0


# -- CLI and asset ------------------------------------------------------------------------------


def test_cli_generates_files_and_reports_errors(tmp_path, prompt_midi, monkeypatch, capsys):
    from pipelines.cli import main

    monkeypatch.setenv("ARIA_HOME", str(tmp_path / "home"))
    weights = tmp_path / "home" / "models" / "pretrain" / "tiny" / "model.pt"
    assert main(["generate", str(prompt_midi), "--length", "20"]) == 2
    assert "aria run pretrain" in capsys.readouterr().err

    save_model_pt(weights)
    out = tmp_path / "out"
    args = ["generate", str(prompt_midi), "--length", "20", "--variations", "2", "--out", str(out), "--seed", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["0.mid", "0.png", "1.mid", "1.png"]
    assert str(out / "0.mid") in printed and "IOI ratio" in printed and "tokens/s" in printed

    broken = tmp_path / "broken.mid"
    broken.write_bytes(b"not a midi file")
    assert main(["generate", str(broken), "--run", "tiny"]) == 2
    assert "not_midi" in capsys.readouterr().err
    assert main(["generate", str(prompt_midi), "--run", "other"]) == 2
    assert "aria run pretrain" in capsys.readouterr().err


def test_asset_materializes_samples_metadata_and_mlflow_artifacts(tmp_path, prompt_midi):
    from assets.generation_samples import generation_samples
    from pipelines.resources import AriaHome, MlflowTracking

    home = tmp_path / "home"
    save_model_pt(home / "models" / "pretrain" / "tiny" / "model.pt")
    mlflow = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = {"prompts": [str(prompt_midi), str(tmp_path / "missing.mid")], "run_name": "tiny",
              "length": 24, "variations": 2, "seed": 0}
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        result = dg.materialize([generation_samples], instance=instance,
                                resources={"home": AriaHome(path=str(home)), "mlflow": mlflow},
                                run_config={"ops": {"generation_samples": {"config": config}}})
    assert result.success
    metadata = {k: getattr(v, "value", v) for k, v in
                result.asset_materializations_for_node("generation_samples")[0].metadata.items()}
    assert metadata["samples"] == 2 and metadata["prompts"] == 1 and metadata["tokens_per_s"] > 0
    assert "ioi_ratio" in metadata["drift"] and "missing.mid" in metadata["skipped"]
    assert metadata["piano_roll"].startswith("![piano roll](data:image/png;base64,")
    folder = home / "generation_samples" / "scale"
    assert sorted(p.name for p in folder.iterdir()) == ["0.mid", "0.png", "1.mid", "1.png"]
    artifacts = mlflow.tracker().client.list_artifacts(metadata["mlflow_run_id"], "generation_samples/scale")
    assert sorted(a.path.rsplit("/", 1)[-1] for a in artifacts) == ["0.mid", "0.png", "1.mid", "1.png"]
