"""The names aria_model.tracking gives MLflow things: environment variables, the store's files,
the experiment and run tags. Kept apart from tracking.py, which imports mlflow (seconds), so the
Dagster code location and its step processes load without it.
"""

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"  # mlflow's own variable
PARENT_RUN_ENV = "ARIA_MLFLOW_PARENT_RUN_ID"  # the run a launched script nests its run under
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlruns-artifacts"
DEFAULT_EXPERIMENT = "aria"
LOSS_KEYS = ("train/loss", "val/loss")

TAG_RUN_KIND = "aria.run_kind"  # dagster_run (the parent), asset, training, ...
TAG_DAGSTER_RUN = "dagster_run_id"
TAG_DAGSTER_JOB = "dagster_job"
TAG_ASSET = "dagster_asset_key"
TAG_PARTITION = "dagster_partition_key"
TAG_CODE_VERSION = "code_version"
# Our own key for filters and model-version tags; MLFLOW_GIT_COMMIT carries the same value for the UI.
TAG_GIT_COMMIT = "git_commit"
TAG_GIT_DIRTY = "git_dirty"
TAG_MANIFEST_HASH = "token_shards.manifest_hash"
TAG_SHARD_FILES = "token_shards.files"
TAG_SHARD_TOKENS = "token_shards.tokens"
TAG_TOKENIZER_HASH = "token_shards.tokenizer_hash"
TAG_SOURCE_RUN = "source_run_id"
TAG_INIT_RUN = "init_run_id"  # the run whose weights a run started from (contrastive <- pretrain)
# Run tags a registered checkpoint carries over to its model version.
LINEAGE_TAGS = (TAG_DAGSTER_RUN, TAG_MANIFEST_HASH, TAG_TOKENIZER_HASH, TAG_GIT_COMMIT, TAG_GIT_DIRTY, TAG_INIT_RUN)
