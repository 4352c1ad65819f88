"""Training (library side): recipes, model set-up, the collator, the trainer and the runner."""
