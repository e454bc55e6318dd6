"""Query metrics over named feature matrices: exact FAISS search per metric, which index kinds allow which."""
import numpy as np
import pytest

from deepindex.index.vectors import QUERY_METRICS, allowed_metrics, brute_force, check_metric, exact_knn

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("metric", QUERY_METRICS)
def test_exact_knn_matches_numpy_brute_force(metric):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(300, 12)).astype(np.float32) * rng.uniform(0.1, 5, size=(300, 1)).astype(np.float32)
    q = rng.normal(size=(20, 12)).astype(np.float32)
    s, r = exact_knn(base, q, 7, metric)
    bs, br = brute_force(base, q, 7, "l2" if metric == "l2" else "ip", normalize=metric == "cosine")
    assert (r == br).mean() > 0.99  # same neighbours (ties aside)
    np.testing.assert_allclose(s, bs, rtol=1e-4, atol=1e-4)
    assert (np.diff(s, axis=1) <= 1e-6).all()  # higher is closer, best first


def test_metrics_rank_differently_on_raw_vectors():
    # ip favours long vectors, cosine ignores length, l2 penalises it: the choice matters.
    base = np.array([[1.0, 0.0], [10.0, 3.0], [0.0, 1.0]], np.float32)
    q = np.array([[1.0, 0.05]], np.float32)
    assert exact_knn(base, q, 1, "ip")[1][0, 0] == 1
    assert exact_knn(base, q, 1, "cosine")[1][0, 0] == 0
    assert exact_knn(base, q, 1, "l2")[1][0, 0] == 0
    # normalize=True turns ip into cosine, as the index option does.
    assert exact_knn(base, q, 1, "ip", normalize=True)[1][0, 0] == 0
    # ... and the aliases rank as their metrics do.
    assert exact_knn(base, q, 1, "dot")[1][0, 0] == 1 and exact_knn(base, q, 1, "euclidean")[1][0, 0] == 0


def test_leave_one_out_excludes_the_query_itself():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(50, 4)).astype(np.float32)
    rows_q = np.arange(50)
    _, r = exact_knn(base, base, 5, "l2", exclude=rows_q)
    assert r.shape == (50, 5) and not (r == rows_q[:, None]).any()
    _s, r = exact_knn(base[:3], base[:3], 5, "cosine", exclude=np.arange(3))  # fewer items than k: -1 padding
    assert (r[:, 2:] == -1).all() and (r[:, :2] >= 0).all()


def test_which_index_kinds_answer_which_metric():
    assert allowed_metrics("flat", "ip", True) == ("l2", "ip", "cosine")
    assert allowed_metrics("flat", "ip", True, raw_available=False) == ("cosine",)
    assert allowed_metrics("hnsw", "l2", False) == ("l2",)
    assert allowed_metrics("ivf", "ip", False) == ("ip",)
    assert allowed_metrics("hnsw", "l2", True) == ("cosine",)
    check_metric("cosine", "ivf", "ip", True)
    with pytest.raises(ValueError, match="metric=l2: this hnsw index was built with ip on L2-normalised vectors"):
        check_metric("l2", "hnsw", "ip", True)
    with pytest.raises(ValueError, match=r"^metric: expected one of l2 \(euclidean\), ip \(dot\), cosine, got 'manh"):
        check_metric("manhattan", "flat", "ip", True)
    # The names a user may know them by: dot is ip (an ip-built index answers it), euclidean is l2.
    check_metric("dot", "ivf", "ip", False)
    with pytest.raises(ValueError, match="metric=l2: this hnsw index"):
        check_metric("euclidean", "hnsw", "ip", True)
    with pytest.raises(ValueError, match="vectors: expected a 2-D"):
        exact_knn(np.zeros(4, np.float32), np.zeros((1, 4), np.float32), 1, "l2")
