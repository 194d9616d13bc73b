-- Aria's silent_interval: the longest stretch in which no note sounds, drums included, between the
-- first onset and the last note end; a file passes when it is shorter than $max_silence_s.
-- A note starts a silence when it begins after every earlier note (in Aria's start order) ended.
-- The running latest end is a streaming window over the staged files in order; the file number in
-- the high bits keeps one file's ends from leaking into the next (note ends stay below 2^40 ms).
WITH notes AS (
    SELECT f, unnest(onset_ms) AS onset, unnest(duration) AS duration FROM quality_files
), latest_end AS (
    SELECT f, onset,
           max((f::BIGINT << 40) | (onset + duration)) OVER (ROWS UNBOUNDED PRECEDING) AS file_and_end
    FROM notes
), gaps AS (
    SELECT f, onset - (lag(file_and_end) OVER () & ((1::BIGINT << 40) - 1)) AS gap_ms,
           lag(file_and_end) OVER () >> 40 = f AS after_a_note_of_this_file
    FROM latest_end
), longest AS (
    SELECT f, max(gap_ms) FILTER (after_a_note_of_this_file) AS gap_ms FROM gaps GROUP BY f
)
SELECT file_id,
       greatest(coalesce(gap_ms, 0), 0) / 1000 AS longest_silence_s,
       n_notes > 0 AND greatest(coalesce(gap_ms, 0), 0) / 1000 < $max_silence_s AS silent_interval
FROM quality_files LEFT JOIN longest USING (f)
ORDER BY f;
