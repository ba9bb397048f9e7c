"""Every metric against values worked out by hand."""

import math

import numpy as np
import pytest

from reasonrec import metrics as M


# ----------------------------------------------------------------------------------- ranking
def test_rank_of_truth_tie_rules():
    s = np.array([[0.1, 0.5, 0.5, 0.9], [3.0, 2.0, 1.0, 0.0]])
    truth = np.array([1, 0])
    # row 0: one strictly greater (0.9), one tie (the other 0.5)
    assert M.rank_of_truth(s, truth).tolist() == [2, 0]
    assert M.rank_of_truth(s, truth, ties="optimistic").tolist() == [1, 0]
    assert M.rank_of_truth(s, truth, ties="mean").tolist() == [1.5, 0.0]
    with pytest.raises(ValueError):
        M.rank_of_truth(s, truth, ties="lucky")


def test_constant_scorer_gets_worst_rank_and_nan_is_minus_inf():
    s = np.zeros((1, 5))
    assert M.rank_of_truth(s, np.array([3])).tolist() == [4]
    s = np.array([[np.nan, 0.2, np.nan]])
    assert M.rank_of_truth(s, np.array([1])).tolist() == [0]
    assert M.rank_of_truth(s, np.array([0])).tolist() == [2]  # nan truth = -inf, ties with the other nan


def test_hr_ndcg_values():
    ranks = np.array([0, 1, 2, 4, 5, 100])
    assert M.hit_at_k(ranks, 5).tolist() == [1, 1, 1, 1, 0, 0]
    nd = M.ndcg_at_k(ranks, 5)
    np.testing.assert_allclose(nd, [1.0, 1 / math.log2(3), 0.5, 1 / math.log2(6), 0.0, 0.0])
    out = M.ranking_metrics(ranks, ks=(1, 5))
    assert out["hr@1"] == pytest.approx(1 / 6)
    assert out["hr@5"] == pytest.approx(4 / 6)
    assert out["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 0.5 + 1 / math.log2(6)) / 6)
    np.testing.assert_allclose(M.mrr(np.array([0, 3])), [1.0, 0.25])


def test_full_catalog_excludes_history_but_not_truth():
    s = np.array([[0.9, 0.8, 0.1, 0.7]])
    # truth item 3 ranks behind 0 and 1; excluding the seen items 0 and 1 puts it first
    assert M.rank_full_catalog(s, np.array([3])).tolist() == [2]
    assert M.rank_full_catalog(s, np.array([3]), exclude=[np.array([0, 1])]).tolist() == [0]
    # a repeat purchase: the truth is in the history and still ranked (1 item ahead: item 0)
    assert M.rank_full_catalog(s, np.array([1]), exclude=[np.array([1, 2])]).tolist() == [1]


def test_candidate_variant():
    cands = np.array([[7, 3, 9], [4, 5, 6]])
    scores = np.array([[0.2, 0.9, 0.5], [0.3, 0.3, 0.1]])
    assert M.rank_in_candidates(scores, cands, np.array([9, 4])).tolist() == [1, 1]
    with pytest.raises(ValueError, match="appears 0 times"):
        M.rank_in_candidates(scores, cands, np.array([1, 4]))


# --------------------------------------------------------------------------------------- CTR
def test_auc_with_ties_and_degenerate():
    y = np.array([1, 0, 1, 0])
    s = np.array([0.8, 0.4, 0.4, 0.1])
    # 4 pos/neg pairs: 1 + 1 + 0.5 (tie) + 1
    assert M.auc(y, s) == pytest.approx(3.5 / 4)
    assert M.auc(np.array([1, 1, 0]), np.array([0.1, 0.2, 0.9])) == 0.0
    assert math.isnan(M.auc(np.array([1, 1]), np.array([0.1, 0.2])))


def test_auc_matches_pairwise_definition_on_random_data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300), 1)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    pairwise = ((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean()
    assert M.auc(y, s) == pytest.approx(pairwise)


def test_log_loss_and_clipping():
    assert M.log_loss(np.array([1, 0]), np.array([0.9, 0.2])) == pytest.approx(-(math.log(0.9) + math.log(0.8)) / 2)
    assert M.log_loss(np.array([0, 1]), np.array([1.0, 0.0])) == pytest.approx(-math.log(1e-7), rel=1e-6)
    out = M.ctr_metrics(np.array([1, 0]), np.array([0.9, 0.2]))
    assert set(out) == {"auc", "logloss"} and out["auc"] == 1.0


# -------------------------------------------------------------------------------------- text
def test_auc_and_log_loss_agree_with_scikit_learn():
    from sklearn.metrics import log_loss, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.random(2000) < 0.2
    p = np.clip(0.3 * y + rng.random(2000) * 0.7, 0, 1)
    p = np.round(p, 2)  # ties, which AUC counts one half
    assert M.auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert M.log_loss(y, p) == pytest.approx(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7)), abs=1e-12)


def test_text_metrics_use_the_libraries_settings():
    # 13a tokenisation and lower-casing: punctuation and case do not change the score
    assert M.bleu4(["The cat, sat."], ["the cat , sat ."]) == pytest.approx(1.0)
    assert "sacrebleu" in M.BLEU_SETTINGS and "rouge-score" in M.ROUGE_SETTINGS


def test_bleu_identical_and_no_4gram():
    assert M.bleu4(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    # "the cat the cat" vs "the cat sat": p1 = 2/4, p2 = 1/3, p3 = 0/2 -> corpus BLEU 0
    assert M.bleu4(["the cat the cat"], ["the cat sat"]) == 0.0
    # smoothed sentence BLEU: p1 = 2/4, p2 = 2/4, p3 = 1/3, p4 = 1/2, no brevity penalty (4 > 3)
    sb = M.sentence_bleu4(["the cat the cat"], ["the cat sat"])
    assert sb[0] == pytest.approx((0.5 * 0.5 * (1 / 3) * 0.5) ** 0.25)


def test_corpus_bleu_sums_counts_and_brevity_penalty():
    hyps = ["a b c d e", "x y"]
    refs = ["a b c d e f", "x z"]
    # matched/total per order over the corpus: 6/7, 4/5, 3/3, 2/2; lengths hyp 7, ref 8
    expected = math.exp(1 - 8 / 7) * (6 / 7 * 4 / 5 * 1 * 1) ** 0.25
    assert M.bleu4(hyps, refs) == pytest.approx(expected)
    # multiple references: clipping uses the max count over references, length the closest one
    assert M.bleu4(["a b c d e f"], [["a b c d e f", "q"]]) == pytest.approx(1.0)


def test_rouge_l():
    # LCS("a b c d", "a c e") = 2 -> P = 1/2, R = 2/3, F1 = 4/7
    assert M.rouge_l_scores(["a b c d"], ["a c e"])[0] == pytest.approx(4 / 7)
    assert M.rouge_l(["a b c d", "z"], ["a c e", "y"]) == pytest.approx(2 / 7)
    # best over references
    assert M.rouge_l_scores(["a b"], [["c", "a b"]])[0] == pytest.approx(1.0)
    tm = M.text_metrics(["a b c d"], ["a b c d"])
    assert tm == {"bleu4": pytest.approx(1.0), "rouge_l": pytest.approx(1.0)}


# ------------------------------------------------------------------------ cold start / groups
def test_cold_start_groups_equal_size_coldest_first():
    assert M.cold_start_groups(np.array([5, 1, 3, 2, 4]), n_groups=5).tolist() == [5, 1, 3, 2, 4]
    n = np.arange(23)[::-1]  # user 22 has the fewest interactions
    g = M.cold_start_groups(n)
    sizes = np.bincount(g)[1:]
    assert sizes.tolist() == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert g[22] == 1 and g[0] == 10
    assert (np.diff(g[np.argsort(n)]) >= 0).all()  # monotone in frequency


def test_breakdown_by_eh_and_groups():
    hr = np.array([1, 0, 1, 1, 0, 0], dtype=float)
    eh = np.array(["low", "high", "low", "medium", "high", "high"])
    groups = np.array([1, 2, 4, 5, 7, 10])
    out = M.breakdown({"hr@5": hr}, eh_bucket=eh, cs_group=groups)
    assert out["all"] == {"hr@5": 0.5, "n": 6}
    assert out["eh:low"] == {"hr@5": 1.0, "n": 2}
    assert out["eh:high"] == {"hr@5": 0.0, "n": 3}
    assert out["eh:medium"] == {"hr@5": 1.0, "n": 1}
    assert out["cs:coldest"] == {"hr@5": 0.5, "n": 2}  # groups 1, 2
    assert out["cs:medium"] == {"hr@5": 1.0, "n": 2}  # groups 4, 5
    assert out["cs:normal"] == {"hr@5": 0.5, "n": 6}
    assert out["cs:7"] == {"hr@5": 0.0, "n": 1}
    with pytest.raises(ValueError):
        M.breakdown({"hr@5": hr}, eh_bucket=eh[:3])


def test_breakdown_fn_for_auc():
    y = np.array([1, 0, 1, 0])
    p = np.array([0.9, 0.1, 0.2, 0.3])
    eh = np.array(["low", "low", "high", "high"])
    out = M.breakdown_fn(lambda m: M.ctr_metrics(y[m], p[m]), 4, eh_bucket=eh)
    assert out["eh:low"]["auc"] == 1.0 and out["eh:high"]["auc"] == 0.0
    assert out["all"]["auc"] == pytest.approx(3 / 4) and out["all"]["n"] == 4


def test_system_disagreement_table_hand_computed():
    """Table 7 numbers from a hand-made set of scored queries (evaluate.disagreement_records)."""
    import pyarrow as pa

    from reasonrec.evaluation import disagreement_records, per_query_correct

    # Sequential, target 7 for every query. Tool top-5 / system top-5 and their top-1:
    #  q0 medium: tool [7..] right,  system [1..] wrong -> disagree (tool right)
    #  q1 high:   tool [1..] wrong,  system [7..] right -> disagree (system right)
    #  q2 high:   tool [7..] right,  system [7..] right -> agree
    #  q3 low:    not answered by the VLM -> left out
    tool = [[7, 1, 2, 3, 4], [1, 2, 3, 4, 5], [7, 1, 2, 3, 4], [7, 1, 2, 3, 4]]
    syst = [[1, 2, 3, 4, 5], [7, 1, 2, 3, 4], [7, 2, 3, 4, 5], [7, 1, 2, 3, 4]]
    preds = pa.table(
        {
            "query_id": [0, 1, 2, 3],
            "task": ["sequential"] * 4,
            "items": syst,
            "tool_items": tool,
            "prob": pa.array([None] * 4, pa.float32()),
            "tool_prob": pa.array([None] * 4, pa.float32()),
        }
    )
    queries = pa.table(
        {
            "query_id": [3, 2, 1, 0],
            "target": [7] * 4,
            "label": pa.array([None] * 4, pa.int8()),
            "reference": pa.array([None] * 4, pa.string()),
        }
    )
    tier = np.array(["medium", "high", "high", "low"])
    got = {
        (r["group"], r["metric"]): (r["value"], r["n"])
        for r in disagreement_records(
            "sequential", "m", preds, per_query_correct(preds, queries), np.ones(4, bool), tier
        )
    }
    assert got[("vlm_answered", "tool_accuracy")] == (2 / 3, 3)
    assert got[("vlm_answered", "system_accuracy")] == (2 / 3, 3)
    assert got[("vlm_answered", "disagreement_rate")] == (2 / 3, 3)
    assert got[("vlm_answered", "system_accuracy_on_disagreement")] == (0.5, 2)
    assert got[("tier:high", "disagreement_rate")] == (0.5, 2)
    assert got[("tier:high", "system_accuracy_on_disagreement")] == (1.0, 1)
    assert got[("tier:high", "tool_accuracy_on_disagreement")] == (0.0, 1)

    # CTR: label 1, 0; tool says 0.8 / 0.7 (right, wrong); system 0.3 / 0.2 (wrong, right).
    preds = pa.table(
        {
            "query_id": [0, 1],
            "task": ["ctr"] * 2,
            "items": pa.array([None, None], pa.list_(pa.int64())),
            "tool_items": pa.array([None, None], pa.list_(pa.int64())),
            "prob": [0.3, 0.2],
            "tool_prob": [0.8, 0.7],
        }
    )
    queries = pa.table(
        {
            "query_id": [0, 1],
            "target": pa.array([None, None], pa.int64()),
            "label": pa.array([1, 0], pa.int8()),
            "reference": pa.array([None, None], pa.string()),
        }
    )
    got = {
        (r["group"], r["metric"]): r["value"]
        for r in disagreement_records(
            "ctr", "m", preds, per_query_correct(preds, queries), np.ones(2, bool), np.array(["high", "medium"])
        )
    }
    assert got[("vlm_answered", "disagreement_rate")] == 1.0
    assert got[("vlm_answered", "tool_accuracy_on_disagreement")] == 0.5
    assert got[("tier:high", "system_accuracy")] == 0.0
