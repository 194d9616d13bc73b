-- Aria's whole-file tests over the staged batch (quality_files, quality_notes), one row per file
-- in quality_files order, with each test's verdict in a column named after the test.
-- Entropies are in bits (DuckDB's entropy() is base 2). Note lengths are rounded half-to-even to
-- 10 ms and capped at $note_length_cap_ms, as Aria rounds them with Python's round(x, -1).
-- A file without non-drum notes fails every test on them, as in Aria.
WITH tonal AS (
    SELECT f,
           avg(velocity) AS mean_velocity,
           entropy(pitch) AS pitch_entropy,
           count(DISTINCT pitch) AS unique_pitches,
           -- FILTER, not NULL-skipping: least(NULL, x) is x in DuckDB
           entropy(least(round_even(next_duration, -1), $note_length_cap_ms)) FILTER (next_duration IS NOT NULL)
               AS length_entropy,
           entropy(next_onset_gap) AS onset_gap_entropy
    FROM quality_notes
    GROUP BY f
), per_file AS (
    SELECT f, file_id, n_notes, n_tonal_notes, n_instruments, n_channels,
           coalesce(last_note_end - first_onset, 0) AS span_ms,
           coalesce(mean_velocity, 0) AS mean_velocity,
           coalesce(pitch_entropy, 0) AS pitch_entropy,
           coalesce(unique_pitches, 0) AS unique_pitches,
           coalesce(length_entropy, 0) AS length_entropy,
           coalesce(onset_gap_entropy, 0) AS onset_gap_entropy
    FROM quality_files LEFT JOIN tonal USING (f)
), rates AS (
    SELECT *,
           span_ms / 1000 AS length_s,
           coalesce(n_notes * 1000 / nullif(span_ms, 0), 0) AS notes_per_s,
           coalesce(n_notes * 1000 / nullif(span_ms, 0), 0) / n_instruments AS notes_per_s_per_instrument
    FROM per_file
)
SELECT file_id, n_notes, n_tonal_notes, length_s, notes_per_s, notes_per_s_per_instrument,
       n_instruments, n_channels, mean_velocity, pitch_entropy, unique_pitches, length_entropy,
       onset_gap_entropy,
       n_tonal_notes > 0 AND length_entropy >= $min_length_entropy
           AND onset_gap_entropy >= $min_onset_gap_entropy AS note_timing_entropy,
       n_tonal_notes > 0 AND pitch_entropy >= $min_pitch_entropy AS note_pitch_entropy,
       unique_pitches >= $min_unique_pitches AS unique_pitch_count,
       n_tonal_notes > 0 AND mean_velocity BETWEEN $min_mean_velocity AND $max_mean_velocity AS mean_note_velocity,
       -- midi_notes has no program numbers: the distinct note channels stand in for them
       n_channels <= $max_programs AS max_programs,
       n_instruments <= $max_instruments AS max_instruments,
       span_ms > 0 AND notes_per_s BETWEEN $min_notes_per_s AND $max_notes_per_s AS total_note_frequency,
       span_ms > 0 AND notes_per_s_per_instrument
           BETWEEN $min_notes_per_s_per_instrument AND $max_notes_per_s_per_instrument AS note_frequency_per_instrument,
       n_notes > 0 AND length_s BETWEEN $min_length_s AND $max_length_s AS length
FROM rates
ORDER BY f;
