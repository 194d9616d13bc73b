-- Does the opus_dedup table hold exactly one row per current manifest file that has notes?
-- $manifest: the raw_midi_manifest Parquet file; $notes: list of midi_notes parts;
-- $dedup: the opus_dedup Parquet file.
WITH expected AS (
    SELECT DISTINCT file_id FROM read_parquet($manifest)
    WHERE file_id IN (SELECT file_id FROM read_parquet($notes))
),
rows_per_file AS (
    SELECT file_id, count(*) AS copies FROM read_parquet($dedup) GROUP BY file_id
)
SELECT
    (SELECT count(*) FROM expected)                                                        AS expected_files,
    (SELECT count(*) FROM expected ANTI JOIN rows_per_file USING (file_id))                AS missing,
    (SELECT count(*) FROM rows_per_file WHERE copies > 1)                                  AS repeated,
    (SELECT count(*) FROM rows_per_file ANTI JOIN expected USING (file_id))                AS unexpected;
