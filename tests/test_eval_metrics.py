"""Evaluation metrics and plots on hand-computed cases (pure Python, no Megatron)."""

import math

import pytest

from megatron_irl.evaluation.metrics import (
    bleu,
    chrf,
    distinct_fraction,
    exact_match,
    extract_answer,
    mean_and_stderr,
    mean_self_bleu,
    rouge,
    score_gap_at_matched_diversity,
    self_bleu,
    spearman,
)
from megatron_irl.evaluation.report import score_setting

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- answer extraction and exact match ---------------------------------------------------------


def test_extract_answer_strips_thousands_commas_and_dollar():
    assert extract_answer("She pays 1,000 + 250 = 1,250.\n#### $1,250") == "1250"


def test_extract_answer_keeps_negative_numbers():
    assert extract_answer("The change is -7.\n#### -7") == "-7"


def test_extract_answer_drops_trailing_fractional_zeros():
    assert extract_answer("#### 12.0") == "12"
    assert extract_answer("#### 0.50") == "0.5"


def test_extract_answer_drops_trailing_period():
    assert extract_answer("#### 42.") == "42"


def test_extract_answer_uses_last_marker_and_stops_at_line_end():
    assert extract_answer("#### 3\nretry\n#### 4\nQuestion: next") == "4"


def test_extract_answer_without_marker_is_none():
    assert extract_answer("The answer is 5.") is None


def test_extract_answer_custom_pattern_uses_last_match_of_first_group():
    assert extract_answer("answer: 3, then answer: 1,024", pattern=r"answer: ([\d,]+)") == "1024"


def test_extract_answer_custom_pattern_without_group_uses_whole_match():
    assert extract_answer("cat dog 17 and 18", pattern=r"\d+") == "18"


def test_extract_answer_bad_pattern_raises_value_error_naming_it():
    with pytest.raises(ValueError, match=r"answer: \(\[0-9"):
        extract_answer("answer: 3", pattern=r"answer: ([0-9")


def test_exact_match_counts_normalised_hits_and_missing_answers_as_wrong():
    predictions = ["#### 1,000", "#### 5", "no answer here", "#### 2.0"]
    references = ["1000", "6", "3", "$2"]
    assert exact_match(predictions, references) == pytest.approx(2 / 4)


def test_exact_match_with_pattern():
    assert exact_match(["The answer is 7", "The answer is 8"], ["7", "7"], pattern=r"answer is (\d+)") == 0.5


def test_exact_match_rejects_unequal_lengths():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match(["#### 1", "#### 2"], ["1"])


# --- ROUGE, BLEU, chrF ---------------------------------------------------------------------------


def test_rouge_of_identical_texts_is_100():
    text = "the cat sat on the mat.\nit was happy."
    assert rouge([text], [text]) == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeLsum": 100.0})


def test_rouge1_matches_hand_computed_f_measure():
    # prediction: 2 unigrams, both in the 6-unigram reference -> P = 1, R = 2/6, F = 2PR/(P+R) = 0.5.
    assert rouge(["the cat"], ["the cat sat on the mat"])["rouge1"] == pytest.approx(50.0)


def test_rouge_averages_over_pairs():
    scores = rouge(["the cat", "a dog"], ["the cat", "the bird"])  # rouge1 per pair: 100 and 0
    assert scores["rouge1"] == pytest.approx(50.0)


def test_bleu_of_identical_corpus_is_100():
    assert bleu(["a b c d e", "x y z w"], ["a b c d e", "x y z w"]) == pytest.approx(100.0)


def test_bleu_matches_hand_computed_geometric_mean():
    # 1..4-gram precisions 4/5, 3/4, 2/3, 1/2 and equal lengths (no brevity penalty).
    expected = 100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert bleu(["a b c d e"], ["a b c d f"]) == pytest.approx(expected)


def test_chrf_of_identical_is_100_and_of_disjoint_characters_is_0():
    assert chrf(["abc def"], ["abc def"]) == pytest.approx(100.0)
    assert chrf(["abc"], ["xyz"]) == pytest.approx(0.0)


# --- diversity -----------------------------------------------------------------------------------


def test_self_bleu_of_identical_samples_is_100():
    assert self_bleu(["the cat sat on the mat"] * 4) == pytest.approx(100.0)


def test_self_bleu_of_samples_without_shared_ngrams_is_near_0():
    assert self_bleu(["alpha beta gamma delta", "one two three four", "red green blue cyan"]) < 1e-6


def test_self_bleu_scores_each_sample_against_the_others():
    samples = ["the cat sat on the mat", "the cat sat on the mat", "one two three four five six"]
    # Samples 1 and 2 each find an exact copy among their references (100); sample 3 shares nothing (0).
    assert self_bleu(samples) == pytest.approx(200 / 3)


def test_self_bleu_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2 samples"):
        self_bleu(["only one"])


def test_mean_self_bleu_averages_over_prompts():
    groups = [["same text here"] * 2, ["alpha beta", "gamma delta"]]
    assert mean_self_bleu(groups) == pytest.approx(50.0)


def test_distinct_fraction_counts_distinct_strings():
    assert distinct_fraction(["a", "b", "a", "c"]) == 0.75


def _sample(line: int, response: str, answer: str) -> dict:
    return {"line": line, "response": response, "reference": "", "answer": answer,
            "entropy": 0.0, "num_tokens": 1}


def test_distinct_correct_counts_distinct_right_responses_per_prompt_including_none():
    samples = [_sample(1, "a #### 3", "3"), _sample(1, "b #### 3", "3"),
               _sample(1, "a #### 3", "3"), _sample(1, "c #### 4", "3"),  # 2 distinct right
               _sample(2, "d #### 5", "6"), _sample(2, "e #### 1", "6")]  # none right
    assert score_setting(samples)["distinct_correct"] == 1.0


# --- statistics ----------------------------------------------------------------------------------


def test_spearman_without_ties_matches_rank_difference_formula():
    # d = [0, -1, 1, 0]: rho = 1 - 6 * 2 / (4 * (16 - 1)) = 0.8
    assert spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)


def test_spearman_gives_ties_their_average_rank():
    # x ranks [1, 2.5, 2.5, 4] vs y ranks [1, 2, 3, 4]: cov 4.5, var 4.5 and 5 -> 4.5 / sqrt(22.5).
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))


def test_spearman_of_reversed_order_is_minus_1():
    assert spearman([1, 2, 3], [9, 5, -1]) == pytest.approx(-1.0)


def test_spearman_of_constant_side_is_nan():
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))


def test_mean_and_stderr_uses_sample_standard_deviation():
    mean, stderr = mean_and_stderr([1.0, 2.0, 3.0])  # sample std 1
    assert (mean, stderr) == pytest.approx((2.0, 1 / math.sqrt(3)))



def test_score_gap_of_parallel_curves_is_their_offset():
    baseline = [(30.0, 0.2), (50.0, 0.4), (70.0, 0.5)]
    curve = [(x, y + 0.1) for x, y in baseline]
    assert score_gap_at_matched_diversity(curve, baseline) == pytest.approx((0.1, 30.0, 70.0))


def test_score_gap_averages_over_the_overlap_of_the_self_bleu_ranges_only():
    curve = [(50.0, 1.0), (200.0, 1.0)]
    baseline = [(0.0, 0.0), (100.0, 0.0)]
    assert score_gap_at_matched_diversity(curve, baseline) == pytest.approx((1.0, 50.0, 100.0))


def test_score_gap_integrates_a_kink_between_the_other_curves_points():
    # Triangle of height 1 over [0, 2] against a flat line: area 1, mean 0.5.
    curve = [(0.0, 0.0), (1.0, 1.0), (2.0, 0.0)]
    baseline = [(2.0, 0.0), (0.0, 0.0)]
    assert score_gap_at_matched_diversity(curve, baseline)[0] == pytest.approx(0.5)
    assert score_gap_at_matched_diversity(baseline, curve)[0] == pytest.approx(-0.5)


def test_score_gap_of_crossing_curves_cancels():
    assert score_gap_at_matched_diversity([(0.0, 1.0), (1.0, 0.0)],
                                          [(0.0, 0.0), (1.0, 1.0)])[0] == pytest.approx(0.0)


def test_score_gap_is_none_without_overlapping_diversity():
    assert score_gap_at_matched_diversity([(0.0, 1.0), (10.0, 1.0)],
                                          [(20.0, 0.0), (30.0, 0.0)]) is None

# --- plots ---------------------------------------------------------------------------------------


def test_plot_score_vs_self_bleu_writes_png(tmp_path):
    from megatron_irl.evaluation.plots import TradeoffPoint, plot_score_vs_self_bleu

    points = [
        {"label": "MLE", "temperature": 1.0, "score": 0.86, "self_bleu": 40.0},
        {"label": "MLE", "temperature": 0.7, "score": 0.92, "self_bleu": 55.0},
        TradeoffPoint(label="IQ-Learn", beam_size=4, score=0.9, self_bleu=70.0),
        TradeoffPoint(label="IQ-Learn", temperature=1.0, score=0.85, self_bleu=36.0),
    ]
    path = plot_score_vs_self_bleu(points, tmp_path / "plots" / "tradeoff.png")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_tradeoff_point_needs_exactly_one_of_temperature_and_beam_size():
    from megatron_irl.evaluation.plots import TradeoffPoint

    with pytest.raises(ValueError, match="exactly one of temperature and beam_size"):
        TradeoffPoint(label="MLE", score=0.5, self_bleu=10.0)


def test_plot_return_vs_score_writes_png(tmp_path):
    from megatron_irl.evaluation.plots import plot_return_vs_score

    path = plot_return_vs_score([-3.0, -1.5, -2.0, 0.5], [0.1, 0.4, 0.3, 0.9], tmp_path / "returns.png")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
