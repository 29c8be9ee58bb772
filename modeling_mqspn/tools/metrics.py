"""The official GMNER / MNER / EEG evaluation (paper §4.1 "Evaluation Metrics"; docs/DESIGN.md §8).

A predicted entity ``(start, end, type, box)`` is correct iff

* its span (word indices, inclusive end) and its type equal a gold entity's, and
* either the gold entity is not groundable and the prediction's box is ``None``, or the gold entity
  has boxes and the predicted box has IoU >= 0.5 (0.5 itself counts) with at least one of them.

IoU is computed in image pixels against the annotated (xml) boxes, never against a candidate list,
so the score does not depend on the region proposals a model happened to use. **GMNER** uses all
three parts, **MNER** drops the region and **EEG** (entity extraction and grounding) drops the type.

Counting: each gold entity is matched at most once (a maximum matching per tweet, so the order of
predictions never matters); a second prediction of an already matched span is a false positive.
Precision = tp / n_pred, recall = tp / n_gold, F1 = 2PR / (P + R), micro-averaged over the corpus
and returned as fractions in [0, 1] (0.0 when a denominator is 0). Per-type rows count a prediction
under its predicted type and a gold entity under its gold type (the paper's Table 2); ``macro`` is
the unweighted mean of the per-type precision, recall and F1 over every type that occurs in the
references or the predictions. EEG ignores types, so its ``per_type`` is empty and its ``macro``
equals its micro values.

Inputs are the evaluation JSONL contract of ``docs/ARCHITECTURE.md``: one dict per tweet,
predictions ``{"id", "entities": [{"start", "end", "type", "box": [x1, y1, x2, y2] | None}]}`` and
references ``{"id", "entities": [{"start", "end", "type", "boxes": [[x1, y1, x2, y2], ...]}]}``
(an empty ``boxes`` list = not groundable). A reference may also carry ``"proposals"`` (the
candidate boxes a model saw); when proposals are given, the result also counts the groundable gold
entities that no proposal covers at IoU >= 0.5 — entities no model restricted to those proposals can
ground correctly, which bounds its EEG and GMNER recall.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..box_ops import box_iou, max_iou
from ..schema_mqspn import parse_box, parse_entity
from .file_utils import parse_json_line, utf8_lines


__all__ = [
    "IOU_THRESHOLD",
    "MNER_ERROR_KINDS",
    "TASKS",
    "evaluate_grounded_ner",
    "format_mner_errors",
    "format_results_table",
    "load_evaluation_jsonl",
    "load_references",
    "mner_errors",
    "prediction_rows",
    "proposal_coverage",
]


IOU_THRESHOLD = 0.5
TASKS = ("gmner", "mner", "eeg")

_Entity = Tuple[int, int, str, Any]  # (start, end, type, box | boxes)


def load_evaluation_jsonl(path: str) -> List[Dict[str, Any]]:
    """Read an evaluation JSONL file (one JSON object per non-empty line).

    Raises ``ValueError`` naming the file and the 1-based line when a line is not valid JSON or not
    an object.
    """
    rows = []
    for line_number, line in utf8_lines(path):
        if not line.strip():
            continue
        row = parse_json_line(line, f"{path}:{line_number}")
        if not isinstance(row, dict):
            raise ValueError(
                f"{path}:{line_number}: expected a JSON object per line, found "
                f"{type(row).__name__}"
            )
        rows.append(row)
    return rows


def prediction_rows(rows: Iterable[Mapping[str, Any]]) -> Tuple[List[Dict[str, Any]], List[str]]:
    """Prediction rows ready to score, and the ids of the failed ones: a row with ``"error"`` and no
    ``"entities"`` (``examples/predict.py`` could not predict that input) becomes ``entities = []``
    (no prediction), and its id is returned so that the caller reports the count."""
    ready, failed = [], []
    for row in rows:
        if isinstance(row, Mapping) and "error" in row and "entities" not in row and "id" in row:
            failed.append(str(row["id"]))
            row = {**row, "entities": []}
        ready.append(row)
    return ready, failed


def load_references(path: str) -> List[Dict[str, Any]]:
    """References from an evaluation JSONL file (``{"id", "entities": [{..., "boxes"}]}``) or from a
    dataset JSONL file (docs/DATA.md; recognised by ``words`` / ``text`` in its first row), which is
    read with the training reader (``tools.data.load_jsonl``: the same checks, boxes optional) so that
    one file serves training and evaluation."""
    rows = load_evaluation_jsonl(path)
    if rows and ("words" in rows[0] or "text" in rows[0]):
        from .data import load_jsonl

        dataset, _ = load_jsonl(path)
        return [{"id": row["id"], "entities": row["entities"]} for row in dataset]
    return rows


def _check_entity(entity: Any, where: str, prediction: bool) -> _Entity:
    """A prediction (`box`: one box or null) or a reference (`boxes`: a list, empty = not groundable), both
    keys required so that a missing region is never read as "no region" by accident."""
    region = "box" if prediction else "boxes"
    parsed = parse_entity(entity, where, region=region, require_region=True)
    return parsed["start"], parsed["end"], parsed["type"], parsed[region]


def _index_rows(rows: Iterable[Mapping[str, Any]], name: str, prediction: bool) -> Dict[str, List[_Entity]]:
    indexed: Dict[str, List[_Entity]] = {}
    for position, row in enumerate(rows):
        if not isinstance(row, Mapping) or "id" not in row or "entities" not in row:
            raise ValueError(f"{name} row {position}: expected an object with 'id' and 'entities'")
        sample_id = str(row["id"])
        if sample_id in indexed:
            raise ValueError(f"{name}: id {sample_id!r} occurs more than once; ids must be unique")
        if not isinstance(row["entities"], (list, tuple)):
            raise ValueError(f"{name} id {sample_id!r}: 'entities' must be a list")
        indexed[sample_id] = [
            _check_entity(entity, f"{name} id {sample_id!r} entity {i}", prediction)
            for i, entity in enumerate(row["entities"])
        ]
    return indexed


def _describe_ids(ids: Iterable[str], limit: int = 10) -> str:
    ids = sorted(ids)
    shown = ", ".join(repr(i) for i in ids[:limit])
    return f"{len(ids)} id(s): {shown}{', ...' if len(ids) > limit else ''}"


def _check_same_ids(gold: Mapping[str, Any], predicted: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` listing the missing and extra ids when predictions and references differ."""
    missing, extra = set(gold) - set(predicted), set(predicted) - set(gold)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no prediction for {_describe_ids(missing)}")
        if extra:
            parts.append(f"predictions for ids not in the references: {_describe_ids(extra)}")
        raise ValueError(
            "prediction and reference ids differ: " + "; ".join(parts)
            + ". Write one prediction row per reference tweet (an empty 'entities' list is fine)."
        )


def _region_correct(box: Optional[Sequence[float]], gold_boxes: Sequence[Sequence[float]], iou_threshold: float) -> bool:
    if box is None or not gold_boxes:
        return box is None and not gold_boxes
    return any(box_iou(box, gold) >= iou_threshold for gold in gold_boxes)


def _max_matching(adjacency: List[List[int]], num_right: int) -> List[Tuple[int, int]]:
    """Maximum bipartite matching (Kuhn's augmenting paths) between predictions (left) and gold
    entities (right); ``adjacency[i]`` lists the gold entities prediction ``i`` may be matched to."""
    match_of_right = [-1] * num_right

    def augment(left: int, visited: List[bool]) -> bool:
        for right in adjacency[left]:
            if visited[right]:
                continue
            visited[right] = True
            if match_of_right[right] == -1 or augment(match_of_right[right], visited):
                match_of_right[right] = left
                return True
        return False

    for left in range(len(adjacency)):
        if adjacency[left]:
            augment(left, [False] * num_right)
    return [(left, right) for right, left in enumerate(match_of_right) if left != -1]


def _matched_pairs(
    predicted: List[_Entity], gold: List[_Entity], task: str, iou_threshold: float
) -> List[Tuple[int, int]]:
    """Pairs (prediction index, gold index) of one tweet under one task's correctness rule."""
    adjacency = []
    for p_start, p_end, p_type, p_box in predicted:
        candidates = []
        for j, (g_start, g_end, g_type, g_boxes) in enumerate(gold):
            if (p_start, p_end) != (g_start, g_end):
                continue
            if task != "eeg" and p_type != g_type:
                continue
            if task != "mner" and not _region_correct(p_box, g_boxes, iou_threshold):
                continue
            candidates.append(j)
        adjacency.append(candidates)
    return _max_matching(adjacency, len(gold))


def _prf(tp: int, n_pred: int, n_gold: int) -> Dict[str, float]:
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _task_result(tp: int, n_pred: int, n_gold: int, per_type_counts: Optional[Dict[str, List[int]]]) -> Dict[str, Any]:
    result: Dict[str, Any] = _prf(tp, n_pred, n_gold)
    per_type: Dict[str, Dict[str, float]] = {}
    if per_type_counts is not None:
        for entity_type in sorted(per_type_counts):
            t_tp, t_pred, t_gold = per_type_counts[entity_type]
            per_type[entity_type] = {**_prf(t_tp, t_pred, t_gold), "tp": t_tp, "n_pred": t_pred, "n_gold": t_gold}
    if per_type:
        macro = {key: sum(row[key] for row in per_type.values()) / len(per_type) for key in ("precision", "recall", "f1")}
    else:
        macro = {key: result[key] for key in ("precision", "recall", "f1")}
    result["per_type"] = per_type
    result["macro"] = macro
    result["counts"] = {"tp": tp, "n_pred": n_pred, "n_gold": n_gold}
    return result


def evaluate_grounded_ner(
    predictions: Iterable[Mapping[str, Any]],
    references: Iterable[Mapping[str, Any]],
    proposals: Optional[Mapping[str, Sequence[Sequence[float]]]] = None,
    iou_threshold: float = IOU_THRESHOLD,
) -> Dict[str, Any]:
    """Score grounded NER predictions with the official protocol (module docstring).

    Args:
        predictions: one dict per tweet, ``{"id", "entities": [{"start", "end", "type", "box"}]}``.
        references: one dict per tweet, ``{"id", "entities": [{"start", "end", "type", "boxes"}]}``,
            optionally with ``"proposals"``.
        proposals: ``{id: [[x1, y1, x2, y2], ...]}``, the candidate boxes per tweet (pixels). When
            omitted and every reference carries ``"proposals"``, those are used.
        iou_threshold: a predicted box is correct at IoU >= this with a gold box.

    Returns:
        ``{"gmner": ..., "mner": ..., "eeg": ...}``, each ``{"precision", "recall", "f1",
        "per_type": {type: {"precision", "recall", "f1", "tp", "n_pred", "n_gold"}}, "macro":
        {"precision", "recall", "f1"}, "counts": {"tp", "n_pred", "n_gold"}}``; with proposals also
        ``"coverage"``, ``proposal_coverage``'s counts (``recall_ceiling`` = the largest EEG recall
        reachable when boxes come from the proposals).

    Raises:
        ValueError: malformed rows, duplicate ids, or prediction and reference ids that differ
            (the message lists the missing and extra ids).
    """
    references = list(references)
    gold = _index_rows(references, "references", prediction=False)
    predicted = _index_rows(predictions, "predictions", prediction=True)
    _check_same_ids(gold, predicted)
    if proposals is None:
        carrying = [str(row["id"]) for row in references if "proposals" in row]
        if carrying and len(carrying) < len(references):
            raise ValueError(
                "only some references carry 'proposals' (missing for "
                f"{_describe_ids(set(gold) - set(carrying))}); give them for every tweet or none"
            )
        if carrying:
            proposals = {str(row["id"]): row["proposals"] for row in references}

    totals = {task: [0, 0, 0] for task in TASKS}  # tp, n_pred, n_gold
    per_type = {task: defaultdict(lambda: [0, 0, 0]) for task in ("gmner", "mner")}
    for sample_id, gold_entities in gold.items():
        predicted_entities = predicted[sample_id]
        for task in TASKS:
            pairs = _matched_pairs(predicted_entities, gold_entities, task, iou_threshold)
            totals[task][0] += len(pairs)
            totals[task][1] += len(predicted_entities)
            totals[task][2] += len(gold_entities)
            if task in per_type:
                rows = per_type[task]
                for _, gold_index in pairs:
                    rows[gold_entities[gold_index][2]][0] += 1
                for entity in predicted_entities:
                    rows[entity[2]][1] += 1
                for entity in gold_entities:
                    rows[entity[2]][2] += 1

    results: Dict[str, Any] = {
        task: _task_result(*totals[task], per_type.get(task)) for task in TASKS
    }
    if proposals is not None:
        results["coverage"] = proposal_coverage(gold, proposals, iou_threshold)
    return results


MNER_ERROR_KINDS = ("duplicate", "wrong_type", "wrong_boundary", "wrong_boundary_and_type", "spurious")


def mner_errors(predictions: Iterable[Mapping[str, Any]], references: Iterable[Mapping[str, Any]]) -> Dict[str, Any]:
    """Where MNER's errors come from (text only; boxes are ignored). Every prediction that is not an exact
    (span, type) match of a gold entity (one to one) is one of:

    - ``duplicate``: it repeats a gold entity that another prediction already matched;
    - ``wrong_type``: its span is a gold entity's, its type another;
    - ``wrong_boundary``: it overlaps a gold entity of its own type, with other boundaries;
    - ``wrong_boundary_and_type``: it overlaps gold entities of other types only, with other boundaries;
    - ``spurious``: it overlaps no gold entity.

    And every gold entity without an exact match is ``missed`` (no prediction overlaps it) or ``misread``
    (a wrong prediction overlaps it). Returns ``{"correct", "n_pred", "n_gold", "false_positives":
    {kind: count}, "false_negatives": {"missed", "misread"}}``; ids must agree as for
    ``evaluate_grounded_ner`` (same errors)."""
    gold = _index_rows(references, "references", prediction=False)
    predicted = _index_rows(predictions, "predictions", prediction=True)
    _check_same_ids(gold, predicted)
    false_positives = dict.fromkeys(MNER_ERROR_KINDS, 0)
    false_negatives = {"missed": 0, "misread": 0}
    correct = n_pred = n_gold = 0
    for sample_id, gold_entities in gold.items():
        gold_left = [entity[:3] for entity in gold_entities]
        wrong = []
        for entity in predicted[sample_id]:
            if entity[:3] in gold_left:
                gold_left.remove(entity[:3])
                correct += 1
            else:
                wrong.append(entity[:3])
        n_pred += len(predicted[sample_id])
        n_gold += len(gold_entities)
        for start, end, kind in wrong:
            overlapping = [g[:3] for g in gold_entities if g[0] <= end and start <= g[1]]
            if (start, end, kind) in overlapping:
                false_positives["duplicate"] += 1
            elif any(g[:2] == (start, end) for g in overlapping):
                false_positives["wrong_type"] += 1
            elif any(g[2] == kind for g in overlapping):
                false_positives["wrong_boundary"] += 1
            elif overlapping:
                false_positives["wrong_boundary_and_type"] += 1
            else:
                false_positives["spurious"] += 1
        for start, end, _ in gold_left:
            hit = any(p_start <= end and start <= p_end for p_start, p_end, _ in wrong)
            false_negatives["misread" if hit else "missed"] += 1
    return {"correct": correct, "n_pred": n_pred, "n_gold": n_gold, "false_positives": false_positives,
            "false_negatives": false_negatives}


def format_mner_errors(errors: Mapping[str, Any]) -> str:
    """``mner_errors``' counts as lines: each kind's count and its share of the wrong predictions or of the
    missed gold entities."""
    wrong = errors["n_pred"] - errors["correct"]
    unfound = errors["n_gold"] - errors["correct"]
    lines = [f"MNER errors: {wrong} of {errors['n_pred']} predictions wrong, {unfound} of {errors['n_gold']} gold "
             "entities not found"]
    for name, counts, total in (("wrong prediction", errors["false_positives"], wrong),
                                ("gold not found", errors["false_negatives"], unfound)):
        for kind, count in counts.items():
            lines.append(f"  {name:<17} {kind:<24} {count:>6} {100 * count / max(total, 1):>6.1f} %")
    return "\n".join(lines)


def proposal_coverage(
    gold: Mapping[str, List[_Entity]],
    proposals: Mapping[str, Sequence[Sequence[float]]],
    iou_threshold: float = IOU_THRESHOLD,
) -> Dict[str, Any]:
    """Count groundable gold entities none of whose boxes any proposal covers at IoU >= threshold
    (docs/DESIGN.md §5, §8). ``gold`` maps ids to ``(start, end, type, boxes)`` tuples.

    Returns ``{"groundable", "uncovered", "covered", "coverage", "recall_ceiling", "per_type"}``:
    ``coverage`` = covered / groundable (the share of groundable entities some proposal can ground;
    0.0 without groundable entities), ``recall_ceiling`` = the largest EEG recall reachable when boxes
    come from the proposals (ungroundable entities count as reachable), ``per_type`` =
    ``{type: {"groundable", "covered", "uncovered", "coverage"}}`` over the types with a groundable entity.
    """
    missing = set(gold) - {str(key) for key in proposals}
    if missing:
        raise ValueError(
            f"proposals are missing for {_describe_ids(missing)}; give an empty list for a tweet "
            "without proposals"
        )
    proposals = {str(key): value for key, value in proposals.items()}
    groundable = uncovered = n_gold = 0
    per_type: Dict[str, List[int]] = defaultdict(lambda: [0, 0])  # groundable, uncovered
    for sample_id, entities in gold.items():
        candidates = [parse_box(box, f"proposals of id {sample_id!r}") for box in proposals[sample_id]]
        n_gold += len(entities)
        for _, _, entity_type, boxes in entities:
            if not boxes:
                continue
            groundable += 1
            per_type[entity_type][0] += 1
            if not any(max_iou(box, candidates) >= iou_threshold for box in boxes):
                uncovered += 1
                per_type[entity_type][1] += 1

    def share(total: int, missed: int) -> float:
        return (total - missed) / total if total else 0.0

    return {
        "groundable": groundable,
        "uncovered": uncovered,
        "covered": groundable - uncovered,
        "coverage": share(groundable, uncovered),
        "recall_ceiling": (n_gold - uncovered) / n_gold if n_gold else 0.0,
        "per_type": {
            entity_type: {"groundable": total, "covered": total - missed, "uncovered": missed, "coverage": share(total, missed)}
            for entity_type, (total, missed) in sorted(per_type.items())
        },
    }


def format_results_table(results: Mapping[str, Any]) -> str:
    """A plain-text table of ``evaluate_grounded_ner``'s result (percentages, micro, per type, macro)."""
    lines = [f"{'task':<6} {'row':<14} {'P':>7} {'R':>7} {'F1':>7} {'tp':>7} {'pred':>7} {'gold':>7}"]
    for task in TASKS:
        result = results[task]
        counts = result["counts"]
        rows = [("micro", result, counts)]
        rows += [(name, row, row) for name, row in result["per_type"].items()]
        if result["per_type"]:
            rows.append(("macro", result["macro"], None))
        for name, row, row_counts in rows:
            count_cells = (
                f"{row_counts['tp']:>7} {row_counts['n_pred']:>7} {row_counts['n_gold']:>7}"
                if row_counts is not None
                else ""
            )
            lines.append(
                f"{task.upper():<6} {name:<14} {100 * row['precision']:>7.2f} {100 * row['recall']:>7.2f} "
                f"{100 * row['f1']:>7.2f} {count_cells}".rstrip()
            )
    if "coverage" in results:
        coverage = results["coverage"]
        lines.append(
            f"proposal coverage: {coverage['uncovered']} of {coverage['groundable']} groundable gold "
            f"entities have no proposal at IoU >= {IOU_THRESHOLD}; EEG recall ceiling "
            f"{100 * coverage['recall_ceiling']:.2f}"
        )
    return "\n".join(lines)
