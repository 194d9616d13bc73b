#!/usr/bin/env bash
# One GPU session's checks, each under its own time limit, logs in $OUT (default /tmp/gpu-session):
#
#   bench   bench/train.py --gpu (medium, 4 x 8192, bf16: ours vs the plain PyTorch loop, eager and
#           per-block compiled, MFU; $ROWS picks rows) and bench/generate.py --sections gpu (KV-cached
#           decode latency)
#   attention  bench/attention.py: each SDPA kernel at the presets' training shapes
#   recipe  python -m aria_model.recipe --preset small on $RECIPE_HOME (pretrain, two contrastive
#           fine-tunes, the probe table with every baseline)
#
#   bash bench/gpu_session.sh bench
#   RECIPE_HOME=/data/aria bash bench/gpu_session.sh recipe
#   DRY_RUN=1 RECIPE_HOME=... bash bench/gpu_session.sh bench recipe   # the same code paths on a CPU, tiny models
#
# Made for a leased machine where every second counts: limits are per step, so a slow step costs
# its own result only. A machine without MLflow runs it too (the MLflow rows and tracking are off).
set -uo pipefail
out=${OUT:-/tmp/gpu-session}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
dry=${DRY_RUN:-}
# medium's pretrain() rows write an ~8 GB checkpoint each: memory-backed scratch where there is room
if [ -z "$dry" ] && [ "$(df --output=avail -BG /dev/shm 2>/dev/null | tail -1 | tr -dc 0-9)" -gt 40 ] 2>/dev/null; then
    export TMPDIR=/dev/shm
fi
"$python" -c "import torch, lightning, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'lightning', lightning.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null

for section in "$@"; do
    case $section in
    bench)
        shards=()
        [ -n "${RECIPE_HOME:-}" ] && shards=(--shards "$RECIPE_HOME/token_shards")
        gpu=(--gpu); gen=(--sections gpu)
        [ -n "$dry" ] && gpu=(--dry-run-gpu-path) && gen=(--dry-run-gpu-path)
        timeout "${TRAIN_S:-300}" "$python" bench/train.py "${gpu[@]}" "${shards[@]}" --gpu-steps 6 --gpu-warmup 2 \
            --rows "${ROWS:-^(?!.*(MLflow|model step, checkpointing))}" 2>&1 | tee "$out/train.log"
        timeout "${GENERATE_S:-110}" "$python" bench/generate.py "${gen[@]}" 2>&1 | tee "$out/generate.log"
        ;;
    attention)
        dry_flag=(); [ -n "$dry" ] && dry_flag=(--dry-run)
        timeout "${ATTENTION_S:-60}" "$python" bench/attention.py "${dry_flag[@]}" 2>&1 | tee "$out/attention.log"
        ;;
    recipe)
        preset=small; pretrain=(train.max_steps=${PRETRAIN_STEPS:-1000})
        contrastive=(train.max_steps=${CONTRASTIVE_STEPS:-250} optim.warmup_steps=25 optim.lr=1e-4)
        [ -n "$dry" ] && preset=tiny && pretrain=(train.max_steps=4) && contrastive=(train.max_steps=2)
        timeout "${RECIPE_S:-330}" "$python" -m aria_model.recipe --home "${RECIPE_HOME:?RECIPE_HOME: the prepared data home}" \
            --preset "$preset" --no-tracking --pretrain "${pretrain[@]}" --contrastive "${contrastive[@]}" 2>&1 \
            | tee "$out/recipe.log"
        cp "$RECIPE_HOME/recipes/recipe-$preset/"{results.parquet,timings.json} "$out/" 2>/dev/null
        cp "$RECIPE_HOME/models/pretrain/recipe-$preset/loss.csv" "$out/pretrain_loss.csv" 2>/dev/null
        ;;
    *) echo "unknown section $section (bench, attention, recipe)"; exit 2 ;;
    esac
done
