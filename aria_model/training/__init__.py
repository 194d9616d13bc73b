"""Training entry points (pretraining; contrastive finetune and probes build on the same parts)."""
