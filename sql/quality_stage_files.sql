-- Stage one batch of midi_notes rows as quality_files, the input of the other quality_* queries
-- (Aria's filter tests). Note lists are in Aria's order (by start tick), so element 1 and element -1
-- are Aria's note_msgs[0] and note_msgs[-1]. Aria runs most tests on the non-drum ("tonal") notes
-- only, kept here as separate lists; quality_stage_notes unnests them.
-- $notes: midi_notes parts; $file_ids: the files of this batch, sorted;
-- $drum_channel / $drum_instrument: aria_model.midi.DRUM_CHANNEL / INSTRUMENTS[DRUM].
CREATE OR REPLACE TEMP TABLE quality_files AS
WITH batch AS (
    SELECT file_id, onset_ms, duration, pitch, velocity, channel, instruments,
           -- the 1-based positions of the non-drum notes, only where there are drums to skip
           CASE WHEN list_contains(channel, $drum_channel)
                THEN list_filter(range(1, len(channel) + 1), lambda i: channel[i] <> $drum_channel)
           END AS tonal_positions
    FROM read_parquet($notes)
    -- the range lets the scan skip row groups: parts are written in file_id order
    WHERE file_id BETWEEN $file_ids[1] AND $file_ids[-1] AND file_id IN (SELECT unnest($file_ids::VARCHAR[]))
), tonal AS (
    SELECT *,
           coalesce(list_select(onset_ms, tonal_positions), onset_ms) AS tonal_onset,
           coalesce(list_select(duration, tonal_positions), duration) AS tonal_duration,
           coalesce(list_select(pitch, tonal_positions), pitch) AS tonal_pitch,
           coalesce(list_select(velocity, tonal_positions), velocity) AS tonal_velocity
    FROM batch
)
SELECT row_number() OVER ()::INTEGER AS f,  -- files are numbered in the order they are stored
       file_id,
       len(pitch) AS n_notes,
       len(tonal_pitch) AS n_tonal_notes,
       onset_ms,
       duration,
       onset_ms[1] AS first_onset,
       onset_ms[-1] + duration[-1] AS last_note_end,  -- Aria: the end of the last note to start
       tonal_onset[1] AS first_tonal_onset,
       tonal_onset[-1] AS last_tonal_onset,
       -- Aria counts the instrument classes and the programs of a file's program changes (piano when
       -- it has none); midi_notes keeps the classes (drums apart) and channels, not program numbers.
       greatest(1, len(list_filter(instruments, lambda i: i <> $drum_instrument))) AS n_instruments,
       len(list_distinct(channel)) AS n_channels,
       tonal_onset,
       tonal_duration,
       tonal_pitch,
       tonal_velocity
FROM tonal;
