-- Quarantined files per reason class, with one example message each.
-- $quarantine: glob of the midi_quarantine Parquet parts.
SELECT reason, count(*) AS files, min(message) AS example
FROM read_parquet($quarantine)
GROUP BY reason
ORDER BY files DESC, reason;
