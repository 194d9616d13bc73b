-- Aria's silent_interval: the longest stretch in which no note sounds, drums included, between the
-- first onset and the last note end; a file passes when it is shorter than $max_silence_s.
-- Walking the notes in Aria's start order, a silence ends at each onset later than every earlier
-- note's end: one list_reduce per file carries the latest end so far and the longest gap.
WITH notes AS (
    SELECT f, file_id, n_notes,
           coalesce(onset_ms, tonal_onset) AS onsets, coalesce(duration, tonal_duration) AS durations
    FROM quality_files
), longest AS (
    SELECT f, file_id, n_notes,
           list_reduce(onsets[2:],
                       lambda acc, onset, i: {'latest_end': greatest(acc.latest_end, onset + durations[i + 1]),
                                              'gap': greatest(acc.gap, onset - acc.latest_end)},
                       {'latest_end': onsets[1] + durations[1], 'gap': 0::BIGINT}).gap AS gap_ms
    FROM notes
)
SELECT file_id,
       greatest(coalesce(gap_ms, 0), 0) / 1000 AS longest_silence_s,
       n_notes > 0 AND greatest(coalesce(gap_ms, 0), 0) / 1000 < $max_silence_s AS silent_interval
FROM longest
ORDER BY f;
