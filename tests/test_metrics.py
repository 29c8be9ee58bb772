"""The official GMNER / MNER / EEG protocol (docs/DESIGN.md §8, docs/DESIGN.md §8)."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling_mqspn.box_ops import box_iou
from modeling_mqspn.tools.metrics import (
    evaluate_grounded_ner,
    format_results_table,
    load_evaluation_jsonl,
    mner_errors,
)

ROOT = Path(__file__).resolve().parents[1]


def gold(start, end, type_, *boxes):
    return {"start": start, "end": end, "type": type_, "boxes": [list(b) for b in boxes]}


def pred(start, end, type_, box=None):
    return {"start": start, "end": end, "type": type_, "box": None if box is None else list(box)}


def score(predicted, reference, **kwargs):
    return evaluate_grounded_ner([{"id": "t", "entities": predicted}], [{"id": "t", "entities": reference}], **kwargs)


# docs/DESIGN.md §8: "Clark Kent meets Lois Lane in Metropolis".
E1_BOX = (40, 28, 296, 600)
E2_BOX = (450, 10, 600, 300)
SLOT_8 = (40, 28, 296, 420)  # IoU 0.73 with E1's box
SLOT_2 = (300, 300, 400, 400)
WORKED_REFERENCES = [gold(0, 1, "PER", E1_BOX), gold(3, 4, "PER", E2_BOX), gold(6, 6, "LOC")]
WORKED_PREDICTIONS = [pred(0, 1, "PER", SLOT_8), pred(3, 4, "PER", None), pred(6, 6, "LOC", SLOT_2)]


def test_worked_example_of_the_reference():
    assert box_iou(SLOT_8, E1_BOX) >= 0.5
    result = score(WORKED_PREDICTIONS, WORKED_REFERENCES)
    for key in ("precision", "recall", "f1"):
        assert result["gmner"][key] == pytest.approx(1 / 3)
        assert result["mner"][key] == pytest.approx(1.0)
        assert result["eeg"][key] == pytest.approx(1 / 3)
    assert result["gmner"]["counts"] == {"tp": 1, "n_pred": 3, "n_gold": 3}
    assert result["gmner"]["per_type"]["PER"] == {
        "precision": 0.5, "recall": 0.5, "f1": 0.5, "tp": 1, "n_pred": 2, "n_gold": 2,
    }
    assert result["gmner"]["per_type"]["LOC"]["f1"] == 0.0
    assert result["gmner"]["macro"]["f1"] == pytest.approx(0.25)
    assert "coverage" not in result


def test_proposal_coverage_counts_uncovered_groundable_entities():
    # Nine candidates: slot 3 and 8 cover E1, none covers E2 (docs/DESIGN.md §8).
    candidates = [(0, 0, 10, 10), SLOT_2, (42, 30, 296, 600)] + [(i, i, i + 20, i + 20) for i in range(5)] + [SLOT_8]
    result = score(WORKED_PREDICTIONS, WORKED_REFERENCES, proposals={"t": candidates})
    coverage = result["coverage"]
    assert {k: coverage[k] for k in ("groundable", "uncovered", "covered")} == {"groundable": 2, "uncovered": 1, "covered": 1}
    assert coverage["recall_ceiling"] == pytest.approx(2 / 3) and coverage["coverage"] == pytest.approx(1 / 2)
    assert sum(row["groundable"] for row in coverage["per_type"].values()) == 2
    # The same proposals carried by the references are picked up without the argument.
    result = evaluate_grounded_ner(
        [{"id": "t", "entities": WORKED_PREDICTIONS}],
        [{"id": "t", "entities": WORKED_REFERENCES, "proposals": [list(b) for b in candidates]}],
    )
    assert result["coverage"]["uncovered"] == 1
    with pytest.raises(ValueError, match="'u'"):
        evaluate_grounded_ner(
            [{"id": "t", "entities": []}, {"id": "u", "entities": []}],
            [{"id": "t", "entities": [], "proposals": []}, {"id": "u", "entities": []}],
        )


def test_iou_of_exactly_one_half_is_correct():
    reference = [gold(0, 0, "PER", (0, 0, 10, 10))]
    assert box_iou((0, 0, 10, 5), (0, 0, 10, 10)) == 0.5
    assert score([pred(0, 0, "PER", (0, 0, 10, 5))], reference)["gmner"]["f1"] == 1.0
    assert score([pred(0, 0, "PER", (0, 0, 10, 4.9))], reference)["gmner"]["f1"] == 0.0


def test_a_box_for_an_ungroundable_entity_is_wrong_and_none_for_a_groundable_one_too():
    result = score([pred(0, 0, "PER", (0, 0, 10, 10))], [gold(0, 0, "PER")])
    assert (result["gmner"]["f1"], result["eeg"]["f1"], result["mner"]["f1"]) == (0.0, 0.0, 1.0)
    result = score([pred(0, 0, "PER", None)], [gold(0, 0, "PER", (0, 0, 10, 10))])
    assert (result["gmner"]["f1"], result["eeg"]["f1"], result["mner"]["f1"]) == (0.0, 0.0, 1.0)


def test_any_one_of_several_gold_boxes_counts():
    reference = [gold(2, 3, "ORG", (0, 0, 10, 10), (100, 100, 200, 200))]
    assert score([pred(2, 3, "ORG", (105, 100, 200, 200))], reference)["gmner"]["f1"] == 1.0
    assert score([pred(2, 3, "ORG", (50, 50, 60, 60))], reference)["gmner"]["f1"] == 0.0


def test_span_and_type_must_match_exactly():
    reference = [gold(2, 3, "ORG")]
    assert score([pred(2, 4, "ORG")], reference)["mner"]["counts"]["tp"] == 0
    result = score([pred(2, 3, "PER")], reference)
    assert (result["mner"]["counts"]["tp"], result["eeg"]["counts"]["tp"]) == (0, 1)


def test_duplicate_predictions_of_one_span_are_extra_predictions():
    result = score([pred(0, 0, "PER"), pred(0, 0, "PER")], [gold(0, 0, "PER")])
    assert result["gmner"]["counts"] == {"tp": 1, "n_pred": 2, "n_gold": 1}
    assert result["gmner"]["precision"] == 0.5 and result["gmner"]["recall"] == 1.0


def test_gold_entities_are_matched_optimally_whatever_the_prediction_order():
    # Two gold entities on one span (possible in user data; EEG ignores the type). The first
    # prediction could serve either, the second only the first gold: a greedy count would give 1.
    a, b = (0, 0, 10, 10), (5, 0, 15, 10)
    reference = [gold(0, 1, "PER", a), gold(0, 1, "LOC", b)]
    both = (0, 0, 15, 10)  # IoU 2/3 with a and with b
    only_a = (0, 0, 10, 10)
    for order in ([pred(0, 1, "X", both), pred(0, 1, "X", only_a)], [pred(0, 1, "X", only_a), pred(0, 1, "X", both)]):
        assert score(order, reference)["eeg"]["counts"]["tp"] == 2


def test_eeg_has_no_per_type_rows_and_macro_equals_micro():
    result = score(WORKED_PREDICTIONS, WORKED_REFERENCES)
    assert result["eeg"]["per_type"] == {}
    assert result["eeg"]["macro"] == {k: result["eeg"][k] for k in ("precision", "recall", "f1")}


def test_per_type_rows_count_predictions_under_their_predicted_type():
    result = score([pred(0, 0, "LOC"), pred(2, 2, "ORG")], [gold(0, 0, "PER"), gold(2, 2, "ORG")])
    rows = result["mner"]["per_type"]
    assert sorted(rows) == ["LOC", "ORG", "PER"]
    assert (rows["LOC"]["n_pred"], rows["LOC"]["n_gold"], rows["PER"]["n_gold"], rows["ORG"]["tp"]) == (1, 0, 1, 1)
    assert result["mner"]["macro"]["f1"] == pytest.approx(1 / 3)


def test_ids_must_match_and_be_unique():
    with pytest.raises(ValueError, match=r"no prediction for 1 id\(s\): 'b'.*not in the references: 1 id\(s\): 'c'"):
        evaluate_grounded_ner(
            [{"id": "a", "entities": []}, {"id": "c", "entities": []}],
            [{"id": "a", "entities": []}, {"id": "b", "entities": []}],
        )
    with pytest.raises(ValueError, match="'a' occurs more than once"):
        evaluate_grounded_ner([{"id": "a", "entities": []}] * 2, [{"id": "a", "entities": []}])


@pytest.mark.parametrize(
    "entity, message",
    [
        ({"start": 0, "end": 0, "type": "PER"}, "no 'box'"),
        ({"start": 2, "end": 1, "type": "PER", "box": None}, "start <= end"),
        ({"start": 0, "end": 0, "type": "PER", "box": [0, 0, 1]}, "4 finite numbers"),
        ({"start": 0, "end": 0, "type": "PER", "box": [0, 0, float("nan"), 1]}, "4 finite numbers"),
    ],
)
def test_malformed_predictions_are_errors_naming_the_sample(entity, message):
    with pytest.raises(ValueError, match=rf"predictions id 't' entity 0: .*{message}"):
        score([entity], [])


def test_empty_corpus_scores_zero():
    result = evaluate_grounded_ner([], [])
    assert result["gmner"]["f1"] == 0.0 and result["gmner"]["counts"]["n_gold"] == 0


def test_bad_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "entities": []}\n\n{"id": "b", "entities": [}\n')
    with pytest.raises(ValueError, match=rf"{path}:3: not valid JSON"):
        load_evaluation_jsonl(str(path))
    path.write_text('[1, 2]\n')
    with pytest.raises(ValueError, match=rf"{path}:1: expected a JSON object"):
        load_evaluation_jsonl(str(path))


# ---------------------------------------------------------------------------------------------
# Properties

boxes_strategy = st.builds(
    lambda x, y, w, h: [x, y, x + w, y + h],
    st.integers(0, 300), st.integers(0, 300), st.integers(1, 200), st.integers(1, 200),
)
entity_strategy = st.builds(
    lambda start, length, type_, boxes: gold(start, start + length, type_, *boxes),
    st.integers(0, 30), st.integers(0, 4), st.sampled_from(["PER", "LOC", "ORG", "OTHER"]),
    st.lists(boxes_strategy, max_size=3),
)
corpus_strategy = st.lists(st.lists(entity_strategy, max_size=5), min_size=1, max_size=8).filter(
    lambda tweets: any(tweets)
).map(lambda tweets: [{"id": f"t{i}", "entities": entities} for i, entities in enumerate(tweets)])


def gold_as_predictions(references):
    return [
        {"id": row["id"], "entities": [pred(e["start"], e["end"], e["type"], e["boxes"][0] if e["boxes"] else None) for e in row["entities"]]}
        for row in references
    ]


@settings(max_examples=60, deadline=None)
@given(corpus_strategy)
def test_gold_as_predictions_scores_one_everywhere(references):
    result = evaluate_grounded_ner(gold_as_predictions(references), references)
    for task in ("gmner", "mner", "eeg"):
        assert result[task]["precision"] == result[task]["recall"] == result[task]["f1"] == 1.0
        assert result[task]["macro"]["f1"] == 1.0
        assert all(row["f1"] == 1.0 for row in result[task]["per_type"].values())


@settings(max_examples=40, deadline=None)
@given(corpus_strategy)
def test_no_predictions_have_zero_recall(references):
    result = evaluate_grounded_ner([{"id": row["id"], "entities": []} for row in references], references)
    for task in ("gmner", "mner", "eeg"):
        assert result[task]["recall"] == 0.0 and result[task]["f1"] == 0.0
        assert result[task]["counts"]["n_gold"] == sum(len(row["entities"]) for row in references)


@settings(max_examples=40, deadline=None)
@given(corpus_strategy, st.integers(0, 2**32 - 1))
def test_tweet_and_entity_order_is_irrelevant(references, seed):
    rng = random.Random(seed)
    predictions = gold_as_predictions(references)
    for row in predictions:  # perturb: drop the box of every other prediction
        for entity in row["entities"][::2]:
            entity["box"] = None
    expected = evaluate_grounded_ner(predictions, references)
    shuffled_predictions = [dict(row, entities=rng.sample(row["entities"], len(row["entities"]))) for row in predictions]
    rng.shuffle(shuffled_predictions)
    shuffled_references = rng.sample(references, len(references))
    assert evaluate_grounded_ner(shuffled_predictions, shuffled_references) == expected


# ---------------------------------------------------------------------------------------------
# The command line


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def run_cli(*args, in_process=True):
    """examples/evaluate.py with these arguments: ``main(argv)`` in this process (stdout / stderr captured), or
    the script in a fresh interpreter (``in_process=False``, as a user runs it). Returns (returncode, stdout,
    stderr) as attributes."""
    if not in_process:
        return subprocess.run(
            [sys.executable, str(ROOT / "examples" / "evaluate.py"), *args], capture_output=True, text=True, cwd=ROOT
        )
    import contextlib
    import io
    import types

    from conftest import load_script

    module = load_script("examples/evaluate.py", "example_evaluate")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = module.main(list(args))
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_cli_end_to_end(tmp_path):
    predictions = write_jsonl(tmp_path / "p.jsonl", [{"id": "t", "entities": WORKED_PREDICTIONS}])
    references = write_jsonl(tmp_path / "r.jsonl", [{"id": "t", "entities": WORKED_REFERENCES}])
    output = tmp_path / "out.json"
    completed = run_cli("--predictions", predictions, "--references", references, "--output", str(output),
                        in_process=False)
    assert completed.returncode == 0, completed.stderr
    result = json.loads(output.read_text())
    assert set(result) == {"gmner", "mner", "eeg"}
    for task in result.values():
        assert set(task) == {"precision", "recall", "f1", "per_type", "macro", "counts"}
    assert result["gmner"]["f1"] == pytest.approx(1 / 3) and result["mner"]["f1"] == 1.0
    assert "GMNER  micro            33.33   33.33   33.33" in completed.stdout
    assert completed.stdout.startswith(format_results_table(result))


def test_cli_reports_bad_jsonl_with_file_and_line(tmp_path):
    predictions = tmp_path / "p.jsonl"
    predictions.write_text('{"id": "t", "entities": []}\nnot json\n')
    references = write_jsonl(tmp_path / "r.jsonl", [{"id": "t", "entities": []}])
    completed = run_cli("--predictions", str(predictions), "--references", references)
    assert completed.returncode == 2
    assert f"{predictions}:2: not valid JSON" in completed.stderr


def test_cli_reports_id_mismatch(tmp_path):
    predictions = write_jsonl(tmp_path / "p.jsonl", [{"id": "x", "entities": []}])
    references = write_jsonl(tmp_path / "r.jsonl", [{"id": "t", "entities": []}])
    completed = run_cli("--predictions", predictions, "--references", references)
    assert completed.returncode == 2 and "'t'" in completed.stderr and "'x'" in completed.stderr


# ---------------------------------------------------------------------------------------------
# The MNER error breakdown


def span(start, end, kind, prediction=True):
    return {"start": start, "end": end, "type": kind, **({"box": None} if prediction else {"boxes": []})}


def test_mner_errors_classifies_each_wrong_prediction_and_each_unfound_gold_entity():
    references = [
        {"id": "a", "entities": [span(0, 1, "PER", False), span(4, 4, "LOC", False), span(7, 8, "ORG", False)]},
        {"id": "b", "entities": [span(2, 3, "ORG", False), span(9, 9, "PER", False)]},
    ]
    predictions = [
        {"id": "a", "entities": [
            span(0, 1, "PER"),   # exact
            span(0, 1, "PER"),   # the same again: the gold entity is taken
            span(4, 4, "ORG"),   # same span, other type
            span(7, 7, "ORG"),   # overlaps the ORG gold, other boundaries
            span(12, 13, "PER"),  # overlaps nothing
        ]},
        {"id": "b", "entities": [span(1, 2, "PER")]},  # overlaps the ORG gold only: boundary and type
    ]
    errors = mner_errors(predictions, references)
    assert (errors["correct"], errors["n_pred"], errors["n_gold"]) == (1, 6, 5)
    assert errors["false_positives"] == {"duplicate": 1, "wrong_type": 1, "wrong_boundary": 1,
                                         "wrong_boundary_and_type": 1, "spurious": 1}
    # LOC (4,4), ORG (7,8) and ORG (2,3) are overlapped by wrong predictions; PER (9,9) by none
    assert errors["false_negatives"] == {"misread": 3, "missed": 1}
    assert sum(errors["false_positives"].values()) == errors["n_pred"] - errors["correct"]
    assert sum(errors["false_negatives"].values()) == errors["n_gold"] - errors["correct"]
    with pytest.raises(ValueError, match="no prediction for 1 id"):
        mner_errors(predictions[:1], references)


def test_cli_errors_flag_prints_and_writes_the_breakdown(tmp_path):
    predictions = write_jsonl(tmp_path / "p.jsonl", [{"id": "t", "entities": [span(0, 0, "PER"), span(5, 6, "LOC")]}])
    references = write_jsonl(tmp_path / "r.jsonl", [{"id": "t", "entities": [span(0, 0, "ORG", False)]}])
    output = tmp_path / "out.json"
    completed = run_cli("--predictions", predictions, "--references", references, "--output", str(output), "--errors")
    assert completed.returncode == 0, completed.stderr
    result = json.loads(output.read_text())["mner_errors"]
    assert result["false_positives"] == {"duplicate": 0, "wrong_type": 1, "wrong_boundary": 0,
                                         "wrong_boundary_and_type": 0, "spurious": 1}
    assert result["false_negatives"] == {"missed": 0, "misread": 1}
    assert "MNER errors: 2 of 2 predictions wrong, 1 of 1 gold entities not found" in completed.stdout
