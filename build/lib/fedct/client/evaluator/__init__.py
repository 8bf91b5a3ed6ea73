"""The evaluator's commands: pull a model from the registry, evaluate it on local data,
and the evaluation's report."""
