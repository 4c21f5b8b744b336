"""Evaluation: task metrics and diversity of samples, extracted rewards, reports and plots."""
