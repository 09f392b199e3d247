"""Dataset layer: one run engine (engine.py) and the dataset functions that run on it."""
