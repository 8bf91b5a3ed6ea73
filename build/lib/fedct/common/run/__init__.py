"""The run directory: a checkpoint and a model card per round, metrics, pointers, and their
one reader."""
