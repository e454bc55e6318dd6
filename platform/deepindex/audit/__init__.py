"""Label audits: K-fold out-of-fold predictions on the cluster, then cleanlab ranks suspect labels.

``detect`` (numpy + cleanlab, no Ray), ``report`` (files and the image grid), ``run`` (the
Ray Tune fan-out over folds, and what the audit's MLflow parent run records; the MLflow calls
themselves are :mod:`deepindex.tracking.audit`'s), ``bench`` (the noisy-label benchmark).
"""
