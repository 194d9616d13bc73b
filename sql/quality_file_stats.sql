-- Aria's whole-file tests over the staged batch (quality_files, quality_pitch_notes), one row per
-- file in quality_files' f order, with each test's verdict in a column named after the test.
-- Entropies are in bits (DuckDB's entropy is base 2), over the non-drum notes. Note lengths are
-- rounded half-to-even to 10 ms and capped at $note_length_cap_ms, as Aria rounds them with Python's
-- round(x, -1).
-- A file without non-drum notes fails every test on them, as in Aria.
WITH pitches AS (
    -- entropy from the notes per pitch: sum of p * log2(1 / p), as DuckDB's entropy() sums it
    SELECT f, count(*) AS unique_pitches,
           sum(len(onsets) / n_tonal_notes * log2(n_tonal_notes / len(onsets))) AS pitch_entropy
    FROM quality_pitch_notes JOIN quality_files USING (f)
    GROUP BY f
), per_file AS (
    SELECT f, file_id, n_notes, n_tonal_notes, n_instruments, n_channels,
           coalesce(last_note_end - first_onset, 0) AS span_ms,
           coalesce(list_avg(tonal_velocity), 0) AS mean_velocity,
           coalesce(pitch_entropy, 0) AS pitch_entropy,
           coalesce(unique_pitches, 0) AS unique_pitches,
           -- Aria skips the first note and measures each onset from the one before it; lengths are
           -- rounded in tens of ms (d / 10 is exact at the halves, and entropy sees classes, not values)
           list_entropy(list_transform(tonal_duration[2:],
                                       lambda d: least(round_even(d / 10, 0), $note_length_cap_ms / 10))) AS length_entropy,
           list_entropy(list_transform(range(2, n_tonal_notes + 1), lambda i: tonal_onset[i] - tonal_onset[i - 1]))
               AS onset_gap_entropy
    FROM quality_files LEFT JOIN pitches USING (f)
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
