"""Training data (library side): dataset loading and validation, the synthetic shape and sound tasks."""
