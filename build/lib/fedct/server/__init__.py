"""Coordinator side: the Flower ServerApp, strategies, central evaluation and checkpoints."""
