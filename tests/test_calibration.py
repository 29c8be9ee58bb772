"""The cross-fitted estimate of the calibrated F1 (modeling_mqspn/tools/calibration.py), on a hand-worked split."""

import pytest

from modeling_mqspn.tools.calibration import choose_threshold, cross_fitted, f1_on


def entity(start, end, kind):
    return {"start": start, "end": end, "type": kind, "box": None}


def gold(start, end, kind):
    return {"start": start, "end": end, "type": kind, "boxes": []}


# Four tweets dealt into two folds by position: a, c (fold 0) and b, d (fold 1). Fold 0 is best decoded at 0.5
# (0.9 loses a's entity), fold 1 at 0.9 (0.5 adds one spurious entity to each of b and d).
REFERENCES = [
    {"id": "a", "entities": [gold(0, 0, "PER")]},
    {"id": "b", "entities": [gold(0, 0, "PER")]},
    {"id": "c", "entities": [gold(1, 1, "LOC")]},
    {"id": "d", "entities": [gold(0, 1, "ORG")]},
]
DECODED = {
    0.5: [
        {"id": "a", "entities": [entity(0, 0, "PER")]},
        {"id": "b", "entities": [entity(0, 0, "PER"), entity(2, 2, "ORG")]},
        {"id": "c", "entities": [entity(1, 1, "LOC")]},
        {"id": "d", "entities": [entity(0, 1, "ORG"), entity(3, 3, "LOC")]},
    ],
    0.9: [
        {"id": "a", "entities": []},
        {"id": "b", "entities": [entity(0, 0, "PER")]},
        {"id": "c", "entities": [entity(1, 1, "LOC")]},
        {"id": "d", "entities": [entity(0, 1, "ORG")]},
    ],
}


def best_on(subset):
    f1 = {threshold: f1_on(rows, subset, "mner") for threshold, rows in DECODED.items()}
    return max(f1, key=f1.get)


def test_each_fold_is_decoded_at_the_threshold_chosen_on_the_other_fold():
    # In-sample, 0.9 wins on the whole split (P 3/3, R 3/4: F1 0.857 against 0.8 at 0.5). Cross-fitted, fold 0
    # takes fold 1's choice 0.9 (a's entity lost) and fold 1 takes fold 0's choice 0.5 (two spurious entities):
    # 3 right of 5 predicted, 4 gold, F1 = 2 * 0.6 * 0.75 / 1.35 = 2/3.
    result = cross_fitted(REFERENCES, "mner", best_on, DECODED.__getitem__)
    assert result["chosen"] == [0.9, 0.5]
    assert abs(result["f1"] - 2 / 3) < 1e-9


def test_a_split_too_small_to_hold_a_fold_out_gives_no_estimate():
    result = cross_fitted(REFERENCES[:1], "mner", best_on, DECODED.__getitem__)
    assert result == {"f1": None, "chosen": None}


def test_leave_one_out_is_the_same_whatever_the_deal():
    # Four folds of one tweet: a and c are decoded at 0.9 (chosen on the other three, where 0.5's spurious
    # entities cost more than 0.9's loss of a), b and d at 0.5 (chosen on the other three, which hold a's entity
    # that 0.9 loses). Pooled: a lost, b and d each with one spurious entity: 3 right of 5, 4 gold, F1 2/3.
    for seed in (None, 0, 1, 2):
        result = cross_fitted(REFERENCES, "mner", best_on, DECODED.__getitem__, folds=4, seed=seed)
        assert abs(result["f1"] - 2 / 3) < 1e-9 and sorted(result["chosen"]) == [0.5, 0.5, 0.9, 0.9]


def test_a_seeded_deal_is_reproducible_and_can_differ_from_the_deal_by_position():
    # Dealt {a, b} / {c, d} instead of {a, c} / {b, d}: {a, b} takes 0.9 (chosen on c, d), {c, d} takes 0.5 (chosen
    # on a, b): a lost, d with one spurious entity: 3 right of 4, F1 0.75; by position the estimate is 2/3.
    results = {seed: cross_fitted(REFERENCES, "mner", best_on, DECODED.__getitem__, seed=seed)["f1"] for seed in range(10)}
    assert results == {seed: cross_fitted(REFERENCES, "mner", best_on, DECODED.__getitem__, seed=seed)["f1"] for seed in range(10)}
    assert all(min(abs(f1 - 2 / 3), abs(f1 - 0.75)) < 1e-9 for f1 in results.values())
    assert any(abs(f1 - 0.75) < 1e-9 for f1 in results.values())


def test_choose_threshold_takes_any_decoder_and_refuses_a_default_it_did_not_decode():
    # The in-sample winner is 0.9 (F1 6/7 against 0.8 at 0.5); cross-fitted by position as worked above.
    found = choose_threshold(DECODED, REFERENCES, "mner", 0.5, study_folds=(2,))
    assert (found["default"], found["chosen"]) == (0.5, 0.9)
    assert found["default_f1"] == pytest.approx(0.8) and found["chosen_f1"] == pytest.approx(6 / 7)
    assert found["cross_fitted_f1"] == cross_fitted(REFERENCES, "mner", best_on, DECODED.__getitem__)["f1"]
    assert [(row["folds"], row["seed"]) for row in found["cross_fitted_study"]] == [(2, None)]
    with pytest.raises(ValueError, match="default threshold 0.7 is not among"):
        choose_threshold(DECODED, REFERENCES, "mner", 0.7)
