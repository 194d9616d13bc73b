-- One row per distinct content of the current manifest, with the metadata opus_dedup reads.
-- A content found at several paths takes the metadata of its first path in relpath order.
-- $manifest: the raw_midi_manifest Parquet file.
SELECT DISTINCT ON (file_id) file_id, composer, opus, piece, title, transcription_score
FROM read_parquet($manifest)
ORDER BY file_id, relpath;
