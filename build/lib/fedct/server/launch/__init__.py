"""Local launchers: a federated simulation, the demo, the centralized and single-site baselines."""
