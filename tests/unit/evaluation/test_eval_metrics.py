"""Evaluation metrics against definitions: pass@k by enumerating subsets, avg@K and maj@K on
hand-made cases (ties included), the bootstrap interval's coverage and width."""

import itertools

import numpy as np
import pytest

from opefo_rllib.evaluation.metrics import (avg_at_k, bootstrap_ci, maj_at_k, majority_answer, pass_at_k,
                                            summarize)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_the_fraction_of_k_subsets_holding_a_correct_sample(n):
    for c in range(n + 1):
        samples = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(samples, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_is_vectorised_and_refuses_k_over_n():
    np.testing.assert_allclose(pass_at_k(4, np.array([0, 1, 4]), 2), [0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="k <= samples"):
        pass_at_k(4, 1, 5)


def test_avg_at_k_is_the_mean_per_problem_accuracy():
    correct = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_allclose(avg_at_k(correct), [0.5, 0.0, 1.0])


def test_majority_vote_counts_answers_ignores_blanks_and_breaks_ties_by_first_appearance():
    assert majority_answer(["3", "4", "4", None, "3", "4"]) == 1          # 4 wins 3:2
    assert majority_answer(["5", "7", "7", "5"]) == 0                     # tie 2:2 -> "5" came first
    assert majority_answer(["7", "5", "5", "7"]) == 0                     # ... and here "7" did
    assert majority_answer([" 1 2", "12", "9"]) == 0                      # whitespace does not split votes
    assert majority_answer([None, "", None]) is None                      # nobody voted
    answers = [["5", "7", "7", "5"], ["1", "2", "2", None], [None, None, None, None]]
    correct = np.array([[1, 0, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(maj_at_k(answers, correct), [1.0, 0.0, 0.0])


def test_bootstrap_interval_contains_the_mean_and_narrows_with_more_problems():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 200, 800):
        x = rng.binomial(8, 0.3, size=n) / 8
        lo, hi = bootstrap_ci(x)
        assert lo <= x.mean() <= hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(4.0, rel=0.25)  # ~ 1/sqrt(n)
    assert bootstrap_ci(x) == bootstrap_ci(x)  # fixed seed: a report is reproducible


def test_summarize_reports_every_metric_by_its_name():
    correct = np.array([[1, 0], [0, 0]])
    out = summarize(correct, [["3", "4"], ["1", "1"]], lengths=[[2, 4], [3, 3]], finished=[[1, 1], [1, 0]],
                    format_ok=[[1, 1], [1, 0]], pass_k=(1, 2), greedy_correct=np.array([1, 0]))
    assert out["greedy_acc"] == 0.5 and out["avg@2"] == 0.25 and out["pass@1"] == 0.25 and out["pass@2"] == 0.5
    assert out["maj@2"] == 0.5  # problem 0: tie "3"/"4" -> "3" (correct); problem 1: "1" (wrong)
    assert out["response_length_mean"] == 3.0 and out["truncated_frac"] == 0.25 and out["format_ok_frac"] == 0.75
    assert out["avg@2_ci95"][0] <= 0.25 <= out["avg@2_ci95"][1]
