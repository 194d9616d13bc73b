-- Aria's note_density_in_interval for one window length $window_s: the most non-drum notes, and
-- the most notes of one pitch, in a window [start, start + $window_s s] (both ends inclusive) whose
-- start steps by 1 s from the first non-drum onset. Passes when neither exceeds its limit per second.
-- A window starting at second k holds seconds k .. k+S-1 plus the notes exactly on its end. One
-- starting at a second without notes holds no more than the next, so only seconds with notes
-- (of the pitch, per pitch) start a window.
WITH window_notes AS (
    SELECT f, max(notes) AS notes
    FROM (
        SELECT f,
               sum(notes) OVER (w RANGE BETWEEN CURRENT ROW AND $window_s - 1 FOLLOWING)
               + coalesce(sum(notes_on_start) OVER (w RANGE BETWEEN $window_s FOLLOWING AND $window_s FOLLOWING), 0)
                   AS notes
        FROM quality_seconds
        WINDOW w AS (PARTITION BY f ORDER BY second)
    )
    GROUP BY f
), window_pitch_notes AS (
    -- from the first note of a pitch in a second to the last note of that pitch at or before the
    -- end of the window starting at that second; quality_notes_by_pitch numbers them consecutively
    SELECT start.f, max(last.position - start.position + 1) AS notes
    FROM (SELECT f, position, pitch_time - since_first_tonal % 1000 + $window_s * 1000 AS window_end
          FROM quality_notes_by_pitch) AS start
    ASOF JOIN (SELECT position, pitch_time FROM quality_notes_by_pitch WHERE last_at_onset) AS last
        ON start.window_end >= last.pitch_time
    GROUP BY start.f
)
SELECT file_id,
       coalesce(window_notes.notes, 0) / $window_s AS max_notes_per_s,
       coalesce(window_pitch_notes.notes, 0) / $window_s AS max_notes_per_s_per_pitch,
       n_tonal_notes > 0
           AND window_notes.notes <= $max_notes_per_s * $window_s
           AND window_pitch_notes.notes <= $max_notes_per_s_per_pitch * $window_s AS note_density_in_interval
FROM quality_files
LEFT JOIN window_notes USING (f)
LEFT JOIN window_pitch_notes USING (f)
ORDER BY f;
