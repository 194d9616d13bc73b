"""bench/scale.py at a tiny size: its corpus builder and the real ingest job (a subprocess, as users
run it) on a fresh home, then again after more files arrive."""

from bench import scale


def test_scale_rehearsal_at_300_files(tmp_path, capsys):
    scale.main(["--files", "300", "--add-share", "0.02", "--corrupt-share", "0.03", "--out", str(tmp_path),
                "--demo-dir", "none", "--in-process", "--workers", "1"])
    out = capsys.readouterr().out
    assert "PASS  the rerun touched only the new files" in out
    assert "PASS  corrupt files quarantined with their reasons" in out
    assert "PASS  peak memory" in out
    for step in ("raw_midi_manifest", "midi_notes", "opus_dedup", "quality_filter", "token_shards"):
        assert f"  {step} " in out  # a timing row per asset
    assert "the ingest job takes" in out  # the extrapolation to Aria-MIDI
