-- Corpus-level figures of the midi_notes table, shown on the asset in the Dagster UI.
-- $notes: glob of the midi_notes Parquet parts.
SELECT
    count(*)                                      AS files,
    sum(n_notes)::BIGINT                          AS notes,
    round(sum(duration_ms) / 3.6e6, 2)            AS hours,
    median(n_notes)                               AS median_notes_per_file,
    round(median(duration_ms) / 1000, 1)          AS median_seconds_per_file,
    round(sum(n_notes) / greatest(sum(duration_ms) / 1000, 1e-9), 2) AS notes_per_second_of_music,
    count(*) FILTER (WHERE len(instruments) > 1)  AS multi_instrument_files
FROM read_parquet($notes);
