"""Evaluation (library side): exact match, image-generation judging."""
