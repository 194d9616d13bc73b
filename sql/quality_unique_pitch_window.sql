-- Aria's unique_pitch_count_in_interval for one window length $window_s: the fewest distinct
-- non-drum pitches in a window [start, start + $window_s s] (both ends inclusive) whose start steps
-- by 1 s from the first note (drums included, as Aria does) until a window reaches the last
-- non-drum onset. Passes when no window holds fewer than $min_unique_pitches.
-- A note lies in the windows starting from second ceil((t - S) / 1 s) to second floor(t / 1 s);
-- the notes of a pitch, in onset order, cover spans of window starts that only break where two
-- notes of the pitch are too far apart. Counting +1 where a span starts and -1 after it ends,
-- the running sum over the starts is the number of pitches in each window.
WITH notes AS (
    SELECT f,
           greatest(0, (since_first - $window_s * 1000 + 999) // 1000) AS first_start,
           since_first // 1000 AS last_start,
           previous_since_first // 1000 AS previous_last_start,
           (next_since_first - $window_s * 1000 + 999) // 1000 AS next_first_start  -- NULL after the last
    FROM quality_notes_by_pitch
), edges AS (
    SELECT f, first_start AS start, 1 AS pitches FROM notes
    WHERE previous_last_start IS NULL OR first_start > previous_last_start + 1
    UNION ALL
    SELECT f, last_start + 1, -1 FROM notes
    WHERE next_first_start IS NULL OR next_first_start > last_start + 1
    UNION ALL
    SELECT f, 0, 0 FROM quality_files  -- the window at 0 counts even where no span starts there
), windows AS (
    SELECT f, start, sum(pitches) OVER (PARTITION BY f ORDER BY start)::INTEGER AS pitches
    FROM (SELECT f, start, sum(pitches) AS pitches FROM edges GROUP BY ALL)
), fewest AS (
    SELECT f, min(pitches) AS pitches
    FROM windows JOIN quality_files USING (f)
    -- Aria's last window is the first to reach the last non-drum onset
    WHERE start <= greatest(0, (last_tonal_onset - first_onset - $window_s * 1000 + 999) // 1000)
    GROUP BY f
)
SELECT file_id,
       coalesce(fewest.pitches, 0) AS min_unique_pitches,
       n_tonal_notes > 0 AND coalesce(fewest.pitches, 0) >= $min_unique_pitches AS unique_pitch_count_in_interval
FROM quality_files LEFT JOIN fewest USING (f)
ORDER BY f;
