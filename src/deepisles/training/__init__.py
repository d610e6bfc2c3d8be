"""Training and fine-tuning of the ensemble members."""
