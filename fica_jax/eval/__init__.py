"""Evaluation: image metrics with fixed, documented conventions (docs/architecture.md §8)."""
