"""OOD metrics against scikit-learn's reference implementations, ties and edge cases included."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from edge_runtime.metrics import POSITIVE_CLASS_NOTE, ood_metrics


def sklearn_reference(idd: np.ndarray, ood: np.ndarray) -> dict[str, float]:
    """The same four numbers from sklearn, IDD positive with confidence = -score."""
    scores = np.concatenate([idd, ood])
    is_idd = np.r_[np.ones(len(idd)), np.zeros(len(ood))]
    fpr, tpr, _ = roc_curve(is_idd, -scores, drop_intermediate=False)
    first = np.flatnonzero(tpr >= 0.95 - 1e-12)[0]
    return {
        "auroc": roc_auc_score(is_idd, -scores),
        "aupr_in": average_precision_score(is_idd, -scores),
        "aupr_out": average_precision_score(1 - is_idd, scores),
        "fpr95": fpr[first],
    }


def assert_matches_sklearn(idd: np.ndarray, ood: np.ndarray) -> None:
    ours, reference = ood_metrics(idd, ood), sklearn_reference(idd, ood)
    assert set(ours) == {"auroc", "aupr_in", "aupr_out", "fpr95"}
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key


def test_continuous_scores_match_sklearn():
    rng = np.random.default_rng(0)
    assert_matches_sklearn(rng.normal(0, 1, 500), rng.normal(1, 1, 300))


def test_heavily_tied_scores_match_sklearn():
    rng = np.random.default_rng(1)
    assert_matches_sklearn(rng.integers(0, 5, 200).astype(float), rng.integers(2, 7, 150).astype(float))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(-3, 3), min_size=1, max_size=40),
    st.lists(st.integers(-3, 3), min_size=1, max_size=40),
)
def test_any_small_tied_sample_matches_sklearn(idd, ood):
    assert_matches_sklearn(np.array(idd, float), np.array(ood, float))


def test_perfect_separation():
    metrics = ood_metrics(np.arange(100.0), np.arange(100.0) + 1000)
    assert metrics == pytest.approx({"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}, abs=1e-12)


@pytest.mark.parametrize("n_idd, n_ood", [(1000, 1000), (9000, 2500), (777, 3333)])
def test_perfect_separation_of_thousands_of_distinct_scores_is_exactly_one(n_idd, n_ood):
    # Sizes at which summing recall fractions gave 1.0000000000000004, which no fraction may be.
    idd = np.arange(n_idd, dtype=float)
    metrics = ood_metrics(idd, n_idd + 0.5 + np.arange(n_ood, dtype=float))
    assert metrics == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}


def test_inverted_scores_flip_auroc_and_accept_every_ood_sample():
    rng = np.random.default_rng(2)
    idd, ood = rng.normal(0, 1, 400), rng.normal(2, 1, 400)
    forward, inverted = ood_metrics(idd, ood), ood_metrics(-idd, -ood)
    assert forward["auroc"] > 0.9
    assert inverted["auroc"] == pytest.approx(1 - forward["auroc"])
    assert ood_metrics(np.arange(10.0) + 100, np.arange(10.0))["fpr95"] == 1.0


def test_all_scores_equal_is_chance():
    metrics = ood_metrics(np.zeros(30), np.zeros(10))
    assert metrics["auroc"] == 0.5
    assert metrics["aupr_in"] == pytest.approx(0.75)
    assert metrics["aupr_out"] == pytest.approx(0.25)
    assert metrics["fpr95"] == 1.0


def test_fpr95_uses_the_lowest_threshold_reaching_95_percent_of_idd():
    # 20 IDD scores 0..19: accepting 95% (19 of them) needs threshold 18; OOD at 18.5 is rejected.
    assert ood_metrics(np.arange(20.0), np.array([17.0, 18.0, 18.5, 30.0]))["fpr95"] == 0.5


@pytest.mark.parametrize(
    ("idd", "ood", "message"),
    [
        ([], [1.0], "idd_scores is empty"),
        ([1.0], [], "ood_scores is empty"),
        ([1.0, np.nan], [1.0], "idd_scores holds 1 NaN"),
        ([1.0], [np.nan, np.nan], "ood_scores holds 2 NaN"),
        ([[1.0]], [1.0], "idd_scores must be one-dimensional"),
    ],
)
def test_invalid_input_names_the_argument(idd, ood, message):
    with pytest.raises(ValueError, match=message):
        ood_metrics(idd, ood)


def test_positive_class_note_names_both_conventions():
    assert POSITIVE_CLASS_NOTE.startswith("IDD is the positive class")
    assert "AUPR-out takes OOD as positive" in POSITIVE_CLASS_NOTE
