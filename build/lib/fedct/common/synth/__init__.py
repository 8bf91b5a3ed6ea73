"""Synthetic chest-CT cohorts that stand in for hospitals."""
