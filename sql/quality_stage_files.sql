-- Stage one batch of midi_notes rows for the other quality_* queries (Aria's filter tests): one row
-- per file, which aria_model.quality registers as quality_files. Note lists are in Aria's order (by
-- start tick), so element 1 and element -1 are Aria's note_msgs[0] and note_msgs[-1]. Aria runs most
-- tests on the non-drum ("tonal") notes only, kept here as separate lists; onset_ms / duration keep
-- every note, drums included, only where drums make them differ (elsewhere NULL: use the tonal lists).
-- Files are numbered f by their place in $file_ids and come fewest notes first.
-- $notes: midi_notes parts; $file_ids: the files of this batch, sorted;
-- $drum_channel / $drum_instrument: aria_model.midi.DRUM_CHANNEL / INSTRUMENTS[DRUM].
WITH batch AS (
    SELECT f, file_id, onset_ms, duration, pitch, velocity, channel, instruments,
           -- the 1-based positions of the non-drum notes, only where there are drums to skip
           CASE WHEN list_contains(channel, $drum_channel)
                THEN list_filter(range(1, len(channel) + 1), lambda i: channel[i] <> $drum_channel)
           END AS tonal_positions
    FROM read_parquet($notes)
    JOIN (SELECT generate_subscripts($file_ids::VARCHAR[], 1)::INTEGER AS f, unnest($file_ids::VARCHAR[]) AS file_id)
        USING (file_id)
    -- the range lets the scan skip row groups: parts are written in file_id order
    WHERE file_id BETWEEN $file_ids[1] AND $file_ids[-1]
), tonal AS (
    SELECT *,
           coalesce(list_select(onset_ms, tonal_positions), onset_ms) AS tonal_onset,
           coalesce(list_select(duration, tonal_positions), duration) AS tonal_duration,
           coalesce(list_select(pitch, tonal_positions), pitch) AS tonal_pitch,
           coalesce(list_select(velocity, tonal_positions), velocity) AS tonal_velocity
    FROM batch
)
SELECT f,
       file_id,
       len(pitch) AS n_notes,
       len(tonal_pitch) AS n_tonal_notes,
       onset_ms[1] AS first_onset,
       onset_ms[-1] + duration[-1] AS last_note_end,  -- Aria: the end of the last note to start
       tonal_onset[1] AS first_tonal_onset,
       tonal_onset[-1] AS last_tonal_onset,
       -- Aria counts the instrument classes and the programs of a file's program changes (piano when
       -- it has none); midi_notes keeps the classes (drums apart) and channels, not program numbers.
       greatest(1, len(list_filter(instruments, lambda i: i <> $drum_instrument))) AS n_instruments,
       -- most files use one channel: min = max spares the hashing of list_distinct
       CASE WHEN list_min(channel) = list_max(channel) THEN 1 ELSE len(list_distinct(channel)) END AS n_channels,
       CASE WHEN tonal_positions IS NOT NULL THEN onset_ms END AS onset_ms,
       CASE WHEN tonal_positions IS NOT NULL THEN duration END AS duration,
       tonal_onset,
       tonal_duration,
       tonal_pitch,
       tonal_velocity
FROM tonal
-- list_reduce steps through the lists of a vector together: lists of alike lengths waste no steps
ORDER BY n_notes;
