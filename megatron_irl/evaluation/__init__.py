"""Evaluation: generation from a checkpoint, task metrics, diversity and extracted rewards."""
