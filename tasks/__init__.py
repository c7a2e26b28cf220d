"""Benchmark tasks: real data, a model, a deterministic training recipe, retraining."""
