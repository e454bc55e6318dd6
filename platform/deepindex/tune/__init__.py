"""Hyperparameter sweeps with Ray Tune over the shared Ray Train trainer.

:mod:`~deepindex.tune.space` loads and validates a search space (a file, or one shipped in ``spaces/``,
which the repository's ``tune_configs/`` links to);
:mod:`~deepindex.tune.driver` runs (or restores) the sweep, records it in MLflow and
promotes the best trial.
"""
