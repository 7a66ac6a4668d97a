"""The one Trainer (loop, checkpoints, resume-by-rerun) and its steps: public pretraining, DP fine-tuning."""
