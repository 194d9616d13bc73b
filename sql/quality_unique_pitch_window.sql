-- Aria's unique_pitch_count_in_interval for each window length of $windows (seconds): the fewest
-- distinct non-drum pitches in a window [start, start + S s] (both ends inclusive) whose start steps
-- by 1 s from the first note (drums included, as Aria does) until a window reaches the last non-drum
-- onset. Passes when no window holds fewer than $min_unique_pitches[i]. One row per file and window,
-- in f then $windows order.
-- A note at t ms from the first note lies in the windows starting from second ceil((t - 1000 S) / 1000)
-- to second floor(t / 1000); the notes of a pitch, in onset order, cover runs of window starts that
-- only break where ceil(later / 1000) - floor(earlier / 1000) > S + 1 for two successive notes of the
-- pitch. Counting +1 where a run starts and -1 after it ends, the running sum over the starts is the
-- number of pitches in each window.
WITH windows AS (
    SELECT i AS window_no, $windows[i] AS seconds, $min_unique_pitches[i] AS min_unique_pitches
    FROM range(1, len($windows) + 1) AS t(i)
), last_starts AS (
    -- Aria's last window is the first to reach the last non-drum onset
    SELECT f, window_no, seconds,
           greatest(0, (last_tonal_onset - first_onset - 1000 * seconds + 999) // 1000) AS last_start
    FROM quality_files, windows
    WHERE n_tonal_notes > 0
), pitch_onsets AS (
    SELECT f, onsets, first_tonal_onset - first_onset AS drums_lead_ms,
           -- the notes where a run may break for the shortest window (longer windows break at a
           -- subset): a break needs more than S s from the note before
           list_filter(range(2, len(onsets) + 1), lambda i: onsets[i] - onsets[i - 1] > shortest_ms) AS candidate_breaks
    FROM quality_pitch_notes JOIN quality_files USING (f), (SELECT 1000 * min(seconds) AS shortest_ms FROM windows)
), single_runs AS (
    -- the pitches covering one run of window starts (most of them)
    SELECT f, window_no, last_start,
           greatest(0, (onsets[1] + drums_lead_ms - 1000 * seconds + 999) // 1000) AS first_start,
           (onsets[-1] + drums_lead_ms) // 1000 + 1 AS after_last_start
    FROM pitch_onsets JOIN last_starts USING (f)
    WHERE len(candidate_breaks) = 0
), spanning AS (
    -- pitches in every window, counted apart from the sweep below
    SELECT f, window_no, count(*) AS pitches
    FROM single_runs
    WHERE first_start = 0 AND after_last_start > last_start
    GROUP BY f, window_no
), edges AS (
    -- a run is coded 4 * start + 0 where it starts (+1) and 4 * (end + 1) + 2 after it ends (-1);
    -- edges after the last window change nothing
    SELECT f, window_no, edge
    FROM (SELECT f, window_no, last_start, unnest([first_start * 4, after_last_start * 4 + 2]) AS edge
          FROM single_runs
          WHERE NOT (first_start = 0 AND after_last_start > last_start))
    WHERE edge // 4 <= last_start
    UNION ALL
    SELECT f, window_no, edge  -- the runs of the other pitches
    FROM (SELECT f, window_no, last_start, unnest(list_concat(
                     list_transform(list_concat([1], breaks), lambda a:
                         greatest(0, (onsets[a] + drums_lead_ms - 1000 * seconds + 999) // 1000) * 4),
                     list_transform(list_concat(list_transform(breaks, lambda b: b - 1), [len(onsets)]), lambda b:
                         ((onsets[b] + drums_lead_ms) // 1000 + 1) * 4 + 2))) AS edge
          FROM (SELECT f, window_no, seconds, last_start, onsets, drums_lead_ms,
                       list_filter(candidate_breaks, lambda b: (onsets[b] + drums_lead_ms + 999) // 1000
                                                               - (onsets[b - 1] + drums_lead_ms) // 1000
                                                               > seconds + 1) AS breaks
                FROM pitch_onsets JOIN last_starts USING (f)
                WHERE len(candidate_breaks) > 0))
    WHERE edge // 4 <= last_start
    UNION ALL
    -- the window at 0 counts even where no run starts there (coded 4 * 0 + 1: no change)
    SELECT f, window_no, 1 AS edge
    FROM last_starts
), fewest AS (
    -- sorted, the runs starting at a window come before those ending there; the fewest pitches
    -- are in a window where a run ends, or at 0, so the count is taken after those edges only.
    -- The reduce carries 1024 * pitches + fewest.
    SELECT f, window_no,
           coalesce(spanning.pitches, 0)
           + list_reduce(run_edges,
                         lambda acc, e: (acc // 1024 + 1 - e % 4) * 1024
                                        + CASE WHEN e % 4 = 0 THEN acc % 1024
                                               ELSE least(acc % 1024, acc // 1024 + 1 - e % 4) END,
                         1023) % 1024 AS pitches
    FROM (SELECT f, window_no, list(edge ORDER BY edge) AS run_edges
          FROM edges
          GROUP BY f, window_no
          ORDER BY len(run_edges))
    LEFT JOIN spanning USING (f, window_no)
)
SELECT file_id,
       seconds AS window_s,
       coalesce(fewest.pitches, 0)::INTEGER AS min_unique_pitches,
       n_tonal_notes > 0 AND coalesce(fewest.pitches, 0) >= min_unique_pitches AS unique_pitch_count_in_interval
FROM quality_files
CROSS JOIN windows
LEFT JOIN fewest USING (f, window_no)
ORDER BY f, window_no;
