"""Jobs users run: ``dagster job execute -m pipelines.definitions -j <name>`` or ``aria run <name>``."""

from __future__ import annotations

import dagster as dg

INGEST_ASSETS = [
    "demo_corpus", "raw_midi_manifest", "midi_notes", "midi_quarantine",
    "opus_dedup", "quality_filter", "token_shards",
]
TRAINING_ASSETS = ["pretrained_model"]
FINETUNE_ASSETS = ["contrastive_model", "contrastive_scratch"]
EVALUATE_ASSETS = ["probe_dataset", "probe_eval"]
# Jobs that occupy a GPU carry this tag; dagster.yaml lets one such run go at a time.
GPU_TAGS = {"aria/resource": "gpu"}

ingest_job = dg.define_asset_job(
    "ingest",
    selection=dg.AssetSelection.assets(*INGEST_ASSETS),
    description="Demo corpus (when no source is set) -> manifest -> notes + quarantine -> dedup -> quality filter -> token shards.",
)

pretrain_job = dg.define_asset_job(
    "pretrain",
    selection=dg.AssetSelection.assets("pretrained_model"),
    tags=GPU_TAGS,
    description="Pretrain (or resume) the Aria transformer on the current token shards. "
                "`aria run pretrain --with-missing-upstream` first materializes upstream assets that were never built.",
)

finetune_job = dg.define_asset_job(
    "finetune",
    selection=dg.AssetSelection.assets(*FINETUNE_ASSETS),
    tags=GPU_TAGS,
    description="Contrastive fine-tune of the latest pretrained model into the embedding model, and the same "
                "training from scratch (the paper's baseline). Resumes stopped runs.",
)

evaluate_job = dg.define_asset_job(
    "evaluate",
    selection=dg.AssetSelection.assets(*EVALUATE_ASSETS),
    tags=GPU_TAGS,  # probe_eval embeds every probe file with three models
    description="Labeled probe dataset (piece-disjoint split) -> linear probes of the contrastive, from-scratch, "
                "mean-pooled LM, handcrafted and majority methods: <home>/probe_eval/results.parquet.",
)

full_job = dg.define_asset_job(
    "full",
    selection=dg.AssetSelection.assets(*INGEST_ASSETS, *TRAINING_ASSETS, *FINETUNE_ASSETS, *EVALUATE_ASSETS),
    tags=GPU_TAGS,
    description="Everything: ingest -> pretrain -> finetune -> evaluate.",
)

generate_job = dg.define_asset_job(
    "generate",
    selection=dg.AssetSelection.assets("generation_samples"),
    tags=GPU_TAGS,
    description="Continue held-out prompts with the latest pretrained model: MIDI, piano rolls, tempo drift.",
)

# A job's name must differ from every op name in the code location, or the location fails to load
# (dagster dev, definitions validate): the ablation jobs are verbs, like the others, and their assets nouns.
ablation_contrastive_epochs_job = dg.define_asset_job(
    "ablate_contrastive_epochs",
    selection=dg.AssetSelection.assets("ablation_contrastive_epochs"),
    tags=GPU_TAGS,
    description="Probe accuracy after 0 / 1 / ... contrastive epochs, from the pretrained model and from scratch: "
                "<home>/ablations/contrastive_epochs/summary.parquet.",
)

ablation_data_scale_job = dg.define_asset_job(
    "ablate_data_scale",
    selection=dg.AssetSelection.assets("ablation_data_scale"),
    tags=GPU_TAGS,
    description="Pretrain on 10 / 25 / 50 / 100 % of the train split's pieces (same steps), then contrastive + "
                "probe: <home>/ablations/data_scale/summary.parquet.",
)

ablation_tokenizer_job = dg.define_asset_job(
    "ablate_tokenizer",
    selection=dg.AssetSelection.assets("ablation_tokenizer"),
    tags=GPU_TAGS,
    description="Absolute vs relative tokenizer, same model, notes and steps: validation loss per note and tempo "
                "drift of continuations: <home>/ablations/tokenizer/summary.parquet.",
)
ABLATION_JOBS = [ablation_contrastive_epochs_job, ablation_data_scale_job, ablation_tokenizer_job]

JOBS = [ingest_job, pretrain_job, finetune_job, evaluate_job, full_job, generate_job, *ABLATION_JOBS]

# The job the README's first command runs.
MAIN_JOB = "full"
