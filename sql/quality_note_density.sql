-- Aria's note_density_in_interval for each window length of $windows (seconds): the most non-drum
-- notes, and the most notes of one pitch, in a window [start, start + S s] (both ends inclusive)
-- whose start steps by 1 s from the first non-drum onset. Passes when neither exceeds its limit per
-- second ($max_notes_per_s[i], $max_notes_per_s_per_pitch[i] for window i). One row per file and
-- window, in f then $windows order.
-- Times are counted in half-seconds from the first non-drum onset, h = 2 * second (+ 1 unless the
-- note is right on the second; h = ceil(ms / 1000) + floor(ms / 1000)), so the window starting at
-- second k holds h in [2k, 2k + 2S].
WITH windows AS (
    SELECT i AS window_no, $windows[i] AS seconds, $max_notes_per_s[i] AS max_notes_per_s,
           $max_notes_per_s_per_pitch[i] AS max_notes_per_s_per_pitch
    FROM range(1, len($windows) + 1) AS t(i)
), halves AS (
    SELECT f, n_tonal_notes,
           list_transform(tonal_onset, lambda onset: (onset - first_tonal_onset + 999) // 1000
                                                     + (onset - first_tonal_onset) // 1000) AS h
    FROM quality_files
    WHERE n_tonal_notes > 0
), window_notes AS (
    -- a window that only grows: it takes in each next note, and drops its first note instead of
    -- growing when the two are too far apart; its final size is the most notes in any window
    -- (windows start on the second of a note). (h | 1) + 2S - 1 is the last h of the window
    -- starting on the second of h.
    SELECT f, window_no,
           list_reduce(h, lambda size, x, i: size + (x <= (h[i - size] | 1) + (2 * seconds - 1))::INTEGER, 0) AS notes
    FROM halves, windows
), window_pitch_notes AS (
    -- the same per pitch (windows start on the second of a note of the pitch)
    SELECT f, window_no,
           max(list_reduce(h, lambda size, x, i: size + (x <= (h[i - size] | 1) + (2 * seconds - 1))::INTEGER, 0)) AS notes
    FROM (SELECT f, list_transform(onsets, lambda onset: (onset + 999) // 1000 + onset // 1000) AS h
          FROM quality_pitch_notes),
         windows
    GROUP BY f, window_no
)
SELECT file_id,
       seconds AS window_s,
       coalesce(window_notes.notes, 0) / seconds AS max_notes_per_s,
       coalesce(window_pitch_notes.notes, 0) / seconds AS max_notes_per_s_per_pitch,
       n_tonal_notes > 0
           AND window_notes.notes <= max_notes_per_s * seconds
           AND window_pitch_notes.notes <= max_notes_per_s_per_pitch * seconds AS note_density_in_interval
FROM quality_files
CROSS JOIN windows
LEFT JOIN window_notes USING (f, window_no)
LEFT JOIN window_pitch_notes USING (f, window_no)
ORDER BY f, window_no;
