"""Intervals and paired tests of the evaluation report, against published and hand-computed values."""

import numpy as np
import pytest

from expqa.evaluation.evaluate import choose_calibrated, compare_models, taught_question_ids
from expqa.evaluation.significance import (
    binomial_two_sided_p,
    bootstrap_indices,
    compare_per_item,
    compare_proportions,
    mcnemar_exact,
    mean_statistic,
    pooled_perplexity,
    sign_test,
    wilson_interval,
)


@pytest.mark.parametrize(
    "successes,n,lo,hi",
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_interval_matches_newcombe_1998_table_1(successes, n, lo, hi):
    assert wilson_interval(successes, n) == pytest.approx((lo, hi), abs=5e-5)


def test_wilson_interval_by_hand():
    # 15/60, z = 1.96: centre (0.25 + 1.96^2/120) / (1 + 1.96^2/60) = 0.26504, half-width 0.10728
    lo, hi = wilson_interval(15, 60, z=1.96)
    assert (lo, hi) == pytest.approx((0.26504 - 0.10728, 0.26504 + 0.10728), abs=2e-5)


def test_exact_binomial_and_mcnemar_by_hand():
    assert binomial_two_sided_p(2, 10) == 2 * (1 + 10 + 45) / 1024  # 0.109375
    assert binomial_two_sided_p(8, 10) == binomial_two_sided_p(2, 10)
    assert binomial_two_sided_p(9, 10) == 2 * (1 + 10) / 1024
    assert binomial_two_sided_p(5, 10) == 1.0 and binomial_two_sided_p(0, 0) == 1.0
    base = [True, True] + [False] * 8 + [True] * 5 + [False] * 3  # 2 base-only, 8 tuned-only, 5 + 3 concordant
    tuned = [False, False] + [True] * 8 + [True] * 5 + [False] * 3
    assert mcnemar_exact(base, tuned) == {"base_only": 2, "tuned_only": 8, "p_value": 0.109375}
    assert sign_test([0.1, -0.2, 0.0, 0.3]) == {"tuned_better": 2, "tuned_worse": 1, "p_value": 1.0}


def test_bootstrap_is_seeded_and_paired():
    a, b = bootstrap_indices(7, 50, seed=42), bootstrap_indices(7, 50, seed=42)
    assert a.shape == (50, 7) and (a == b).all() and not (a == bootstrap_indices(7, 50, seed=1)).all()
    base = np.array([0.1, 0.4, 0.2, 0.9, 0.5])
    report = compare_per_item(base, base + 0.05, mean_statistic, [0.05] * 5, bootstrap_indices(5, 200, seed=0))
    # a constant shift: every resample's difference is exactly the shift
    assert report["delta"] == pytest.approx(0.05) and report["delta_ci95_lo"] == pytest.approx(0.05)
    assert report["delta_ci95_hi"] == pytest.approx(0.05) and report["tuned_better"] == 5
    assert report["p_value"] == 2 / 32 and report["base_ci95_lo"] <= report["base"] <= report["base_ci95_hi"]


def test_pooled_perplexity_weights_conversations_by_tokens():
    items = np.array([[-2.0, 1.0], [-4.0, 3.0]])  # 6 nats over 4 tokens
    assert pooled_perplexity(items[None])[0] == pytest.approx(np.exp(1.5))


def test_compare_proportions_fields():
    report = compare_proportions(
        [True, False, False, True], [True, True, True, False], bootstrap_indices(4, 100, seed=3)
    )
    assert report["base"] == 0.5 and report["tuned"] == 0.75 and report["delta"] == 0.25 and report["n"] == 4
    assert (report["base_ci95_lo"], report["base_ci95_hi"]) == wilson_interval(2, 4)
    assert report["base_only"] == 1 and report["tuned_only"] == 2 and report["p_value"] == 1.0


def test_calibrated_choice_subtracts_the_unconditional_log_probability():
    # option 0: -3 given the question, -1 without it (gain -2); option 1: -5 and -6 (gain +1) -> option 1
    assert choose_calibrated([(-3.0, 2), (-5.0, 4)], [-1.0, -6.0]) == 1
    assert choose_calibrated([(-1.0, 1), (-1.0, 1)], [0.0, 0.0]) == 0  # ties go to the first option


def test_taught_questions_need_a_taught_by_row_in_the_train_split():
    questions = [
        {"id": "q1", "taught_by": ["cv-1"]},
        {"id": "q2", "taught_by": ["cv-9"]},
        {"id": "q3", "taught_by": []},
        {"id": "q4", "taught_by": ["cv-9", "ax-2"]},
    ]
    assert taught_question_ids(questions, ["cv-1#w2", "ax-2", "cv-5"]) == {"q1", "q4"}


def test_compare_models_report_layout():
    def rows(logprob, rouge, stopped, chosen):
        conversations = [
            {
                "id": f"c{i}",
                "logprob": logprob * (i + 1),
                "tokens": 10 * (i + 1),
                "rouge1": rouge,
                "rouge2": rouge / 2,
                "rougeL": rouge,
                "stopped": stopped,
            }
            for i in range(4)
        ]
        questions = [
            {"id": f"q{i}", "chosen": c, "chosen_calibrated": 1, "answer_index": 1} for i, c in enumerate(chosen)
        ]
        return conversations + questions

    base = rows(-30.0, 0.1, False, [0, 0, 1, 1])
    tuned = rows(-20.0, 0.2, True, [1, 1, 1, 0])
    report = compare_models(base, tuned, {"q0", "q1"}, samples=100, seed=42)
    assert report["test_examples"] == 4 and report["perplexity"]["assistant_tokens"] == 100
    assert report["perplexity"]["base"] == pytest.approx(np.exp(3.0)) and report["perplexity"]["tuned_better"] == 4
    # every conversation has the same per-token log-probability: each resample gives exp(2) / exp(3) - 1
    assert report["perplexity"]["relative_delta"] == pytest.approx(np.exp(-1.0) - 1)
    assert report["perplexity"]["relative_delta_ci95_lo"] == pytest.approx(np.exp(-1.0) - 1)
    assert report["rougeL"]["delta"] == pytest.approx(0.1) and report["stop_rate"]["tuned_only"] == 4
    critical = report["critical_questions"]
    assert critical["questions"] == 4 and critical["taught"] == 2
    assert critical["length_norm"]["base"] == 0.5 and critical["length_norm"]["tuned"] == 0.75
    assert critical["length_norm_taught"]["tuned"] == 1.0 and critical["length_norm_untaught"]["tuned"] == 0.5
    assert critical["calibrated"]["delta"] == 0.0 and critical["calibrated"]["p_value"] == 1.0
    assert compare_models(base, tuned, {"q0", "q1"}, samples=100, seed=42) == report  # seeded: the same report
