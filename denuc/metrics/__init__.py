"""Scoring predicted nuclei against ground truth: point matching and the protocols built on it."""
