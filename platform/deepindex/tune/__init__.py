"""Hyperparameter sweeps with Ray Tune over the shared Ray Train trainer.

:mod:`~deepindex.tune.space` loads and validates ``tune_configs/*.yaml``;
:mod:`~deepindex.tune.driver` runs (or restores) the sweep, records it in MLflow and
promotes the best trial.
"""
