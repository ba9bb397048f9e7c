"""Evidence horizon: the paper's formula on a hand-computed example, the robust normalizers, bucket edges."""

import numpy as np
import pytest

from reasonrec.data.evidence import bucket, fit_normalizer


def _hist(counts):
    vals, users = np.unique(np.asarray(counts), return_counts=True)
    return vals, users


def test_max_normalizer_is_the_paper_formula():
    counts = [1, 2, 5, 10]  # max = 10 -> C = 1 - n/10
    norm = fit_normalizer("max", *_hist(counts))
    np.testing.assert_allclose(norm(np.array(counts)), [0.9, 0.8, 0.5, 0.0], rtol=0, atol=1e-7)


def test_quantile_normalizer_caps_heavy_users():
    counts = [1] * 8 + [4, 100]  # cumulative users 8, 9, 10: the 0.9-quantile is 4
    norm = fit_normalizer("quantile", *_hist(counts), quantile=0.9)
    assert norm.cap == 4.0
    np.testing.assert_allclose(norm(np.array([1, 2, 4, 100])), [0.75, 0.5, 0.0, 0.0], atol=1e-7)


def test_rank_normalizer_uses_mid_ranks():
    counts = [1, 1, 2, 3]  # mid-rank CDF: 1 -> (0 + 1)/4 = .25, 2 -> (2 + .5)/4 = .625, 3 -> .875
    norm = fit_normalizer("rank", *_hist(counts))
    np.testing.assert_allclose(norm(np.array([1, 2, 3])), [0.75, 0.375, 0.125], atol=1e-7)


def test_log_normalizer():
    norm = fit_normalizer("log", *_hist([0, 3, 15]))
    np.testing.assert_allclose(norm(np.array([0, 3, 15])), [1.0, 1 - np.log(4) / np.log(16), 0.0], atol=1e-6)


def test_bucket_edges_follow_the_paper():
    eh = np.array([0.0, 0.2999, 0.3, 0.5, 0.7, 0.7001, 1.0])
    assert list(bucket(eh, (0.3, 0.7))) == ["low", "low", "medium", "medium", "medium", "high", "high"]


def test_unknown_normalizer_rejected():
    norm = fit_normalizer("nope", *_hist([1, 2]))
    with pytest.raises(ValueError, match="nope"):
        norm(np.array([1]))


@pytest.mark.parametrize("kind", ["max", "quantile", "rank", "log"])
def test_normalizer_saves_and_loads_itself_through_a_run_store(tmp_path, kind):
    from reasonrec.data.evidence import EHNormalizer
    from reasonrec.io import ArtifactStore

    counts, users = np.array([3, 5, 9, 40]), np.array([10, 6, 3, 1])
    norm = fit_normalizer(kind, counts, users, 0.9)
    store = ArtifactStore(str(tmp_path), "run")
    with store.stage_writer("prepare", "h", {}) as w:
        norm.save(w)
    back = EHNormalizer.load(store)
    assert back == norm
    probe = np.array([0, 3, 4, 9, 41, 100])
    assert np.array_equal(back(probe), norm(probe))
