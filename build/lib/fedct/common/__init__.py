"""Code shared by hospitals, the coordinator and evaluators: ingestion, cache, model, metrics."""
