-- Files kept per piece cluster of the opus_dedup table, against the cap it was written with.
-- $dedup: the opus_dedup Parquet file; $cap: its max_per_cluster.
WITH per_cluster AS (
    SELECT cluster_id, count(*) FILTER (WHERE kept) AS kept_files
    FROM read_parquet($dedup)
    GROUP BY cluster_id
)
SELECT
    count(*)                                    AS clusters,
    coalesce(max(kept_files), 0)                AS most_kept,
    count(*) FILTER (WHERE kept_files > $cap)   AS over_cap,
    count(*) FILTER (WHERE kept_files = 0)      AS none_kept  -- a cluster's first file is always kept
FROM per_cluster;
