-- quality_notes: one row per non-drum note of quality_files (run quality_stage_files first), in
-- each file's note order. Times count from the first non-drum note (Aria's density and repetition
-- tests) and from the first note, drums included (Aria's unique-pitch windows). next_duration /
-- next_onset_gap belong to the note after this one (NULL on the last row): Aria's timing entropy
-- skips the first note and measures each onset from the one before it.
CREATE OR REPLACE TEMP TABLE quality_notes AS
SELECT f,
       onset - first_tonal_onset AS since_first_tonal,
       onset - first_onset AS since_first,
       pitch,
       velocity,
       next_duration,
       next_onset_gap
FROM (
    SELECT f, first_onset, first_tonal_onset,
           unnest(tonal_onset) AS onset,
           unnest(tonal_pitch) AS pitch,
           unnest(tonal_velocity) AS velocity,
           unnest(tonal_duration[2:]) AS next_duration,
           unnest(list_transform(tonal_onset[2:], lambda onset, i: onset - tonal_onset[i])) AS next_onset_gap
    FROM quality_files
);

-- quality_notes_by_pitch: the same notes sorted by (file, pitch, onset) and numbered in that order,
-- for the per-pitch windows. pitch_time packs file, pitch and onset into one number that sorts the
-- same way (files < 2^16 per batch, onsets < 2^40 ms); last_at_onset marks the last of the notes
-- sharing all three; previous_ / next_since_first are the onsets of the notes of the same pitch
-- before and after this one.
CREATE OR REPLACE TEMP TABLE quality_notes_by_pitch AS
SELECT f, pitch, since_first_tonal, since_first, pitch_time,
       row_number() OVER () AS position,
       lead(pitch_time) OVER () IS DISTINCT FROM pitch_time AS last_at_onset,
       CASE WHEN lag((f, pitch)) OVER () = (f, pitch) THEN lag(since_first) OVER () END AS previous_since_first,
       CASE WHEN lead((f, pitch)) OVER () = (f, pitch) THEN lead(since_first) OVER () END AS next_since_first
FROM (
    SELECT f, pitch, since_first_tonal, since_first,
           (f::BIGINT << 47) | (pitch::BIGINT << 40) | since_first_tonal AS pitch_time
    FROM quality_notes
    ORDER BY pitch_time
);

-- quality_seconds: the non-drum notes of each second from the first one, and those right on its start,
-- for the note-density windows of every length.
CREATE OR REPLACE TEMP TABLE quality_seconds AS
SELECT f,
       since_first_tonal // 1000 AS second,
       count(*) AS notes,
       count(*) FILTER (since_first_tonal % 1000 = 0) AS notes_on_start
FROM quality_notes
GROUP BY ALL;

SELECT count(*) AS notes FROM quality_notes;
