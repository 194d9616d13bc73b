-- The non-drum notes of quality_files (run quality_stage_files first) by pitch: one row per file and
-- pitch, which aria_model.quality registers as quality_pitch_notes. onsets: the pitch's onsets in ms
-- from the first non-drum onset of the file, ascending (the per-pitch windows of Aria's density and
-- unique-pitch tests walk them in order). Rows come shortest list first: list_reduce steps through
-- the lists of a vector together, and lists of alike lengths waste no steps.
-- list() mostly keeps the notes in the order they come (each file's are unnested by one thread), so
-- a list is sorted only where a check finds it out of order, which costs less than sorting them all.
SELECT f, pitch,
       CASE WHEN list_bool_and(list_transform(onsets[2:], lambda onset, i: onset >= onsets[i])) IS NOT false
            THEN onsets ELSE list_sort(onsets) END AS onsets
FROM (
    SELECT f, pitch, list(since_first_tonal) AS onsets
    FROM (
        SELECT f, unnest(tonal_onset) - first_tonal_onset AS since_first_tonal, unnest(tonal_pitch) AS pitch
        FROM quality_files
    )
    GROUP BY f, pitch
)
ORDER BY len(onsets);
