-- Share of the current manifest's distinct contents that sit in the quarantine.
-- $manifest: the manifest Parquet file; $quarantine: list of midi_quarantine parts.
WITH current AS (SELECT DISTINCT file_id FROM read_parquet($manifest))
SELECT
    count(*)                                                          AS manifest_files,
    count(*) FILTER (WHERE file_id IN (SELECT file_id FROM read_parquet($quarantine))) AS quarantined
FROM current;
