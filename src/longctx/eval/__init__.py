"""Evaluation: needle-in-a-haystack grid, the 13 RULER tasks and lm-eval, per model."""
