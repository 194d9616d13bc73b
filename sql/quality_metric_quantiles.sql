-- Distribution of every quality metric over the files of a quality_filter table, for the UI.
-- $quality: the quality.parquet file; $quantiles: the quantiles to report, e.g. [0.05, 0.5, 0.95].
SELECT metric,
       min(value) AS min,
       quantile_cont(value, $quantiles) AS quantiles,
       max(value) AS max
FROM (
    UNPIVOT (SELECT COLUMNS(* EXCLUDE (file_id, passed, failed_rules))::DOUBLE FROM read_parquet($quality))
    ON COLUMNS(*) INTO NAME metric VALUE value
)
GROUP BY metric
ORDER BY metric;
