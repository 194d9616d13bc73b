-- Aria's repetitive_content: a piece whose non-drum onsets span at least $min_length_min minutes is
-- cut into $chunks equal spans, and passes only when some pair of chunks (earlier, later) differs
-- in pitch distribution by a KL divergence (bits) above $min_chunk_kl. Shorter pieces pass with 0.
-- As in Aria, a note exactly on the last onset falls outside the last chunk, empty chunks are left
-- out (fewer than two chunks pass), and the 128 pitch probabilities of a chunk are floored at 1e-5.
WITH long_pieces AS (
    SELECT f, span_ms, unnest(tonal_onset) - first_tonal_onset AS since_first_tonal, unnest(tonal_pitch) AS pitch
    FROM (SELECT *, last_tonal_onset - first_tonal_onset AS span_ms FROM quality_files)
    WHERE span_ms >= $min_length_min * 60000
), chunks AS (
    SELECT f, $chunks * since_first_tonal // span_ms AS chunk, histogram(pitch) AS pitch_notes, count(*) AS notes
    FROM long_pieces
    WHERE $chunks * since_first_tonal // span_ms < $chunks
    GROUP BY ALL
), distributions AS (
    SELECT f, chunk,
           list_transform(range(128), lambda p: coalesce(pitch_notes[p::UTINYINT] / notes, 1e-5)) AS probability
    FROM chunks
), divergences AS (
    SELECT earlier.f,
           abs(list_sum(list_transform(earlier.probability,
                                       lambda p, i: p * log2(p / later.probability[i])))) AS kl
    FROM distributions AS earlier
    JOIN distributions AS later ON earlier.f = later.f AND earlier.chunk < later.chunk
), most_divergent AS (
    SELECT f, max(kl) AS kl FROM divergences GROUP BY f
)
SELECT file_id,
       coalesce(most_divergent.kl, 0) AS max_chunk_kl,
       n_tonal_notes > 0 AND (most_divergent.kl IS NULL OR most_divergent.kl > $min_chunk_kl) AS repetitive_content
FROM quality_files LEFT JOIN most_divergent USING (f)
ORDER BY f;
