"""Label audits: K-fold out-of-fold predictions on the cluster, then cleanlab ranks suspect labels.

``detect`` (numpy + cleanlab, no Ray), ``report`` (files and the image grid), ``run`` (the
Ray Tune fan-out over folds and the MLflow parent run).
"""
