-- Files failing each quality rule in a quality_filter table (a file may fail several).
-- $quality: the quality.parquet file.
SELECT rule, count(*) AS files
FROM (SELECT unnest(failed_rules) AS rule FROM read_parquet($quality))
GROUP BY rule
ORDER BY files DESC, rule;
