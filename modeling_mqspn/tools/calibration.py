"""The decision threshold chosen on dev with the official metric (docs/DEVIATIONS.md, "Calibrated decision
threshold").

With the ∅ weight 0.1 the existence probability P^c = 0.5 is not a 0.5 posterior, so after training the
threshold is chosen on dev: the model runs once over the split, the outputs are decoded at every threshold of a
grid (``decode_predictions`` exactly, not a filter of one decoding: the flat-span rule makes decoding at t not a
subset of decoding at a lower t), each decoding is scored with ``evaluate_grounded_ner`` and the threshold with
the best F1 of the chosen task wins (ties: the one closest to the default). The existence head's threshold is
``config.existence_threshold``, the softmax head's ``config.softmax_threshold`` (None = keep every non-∅
argmax); ``examples/train.py`` writes the chosen value into ``best/config.json``, so every path that decodes the
checkpoint (pipeline, predict, evaluate, the Space) uses it.
"""

from __future__ import annotations

import random
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from ..interface_mqspn import select_model_inputs
from .metrics import evaluate_grounded_ner

__all__ = [
    "EXISTENCE_GRID",
    "SOFTMAX_GRID",
    "calibrate_best_checkpoint",
    "calibrate_threshold",
    "choose_threshold",
    "cross_fitted",
    "decode_at",
    "f1_on",
    "dev_outputs",
    "threshold_field",
]

EXISTENCE_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 ... 0.95
SOFTMAX_GRID = (None,) + tuple(round(0.05 * i, 2) for i in range(6, 20))  # none, 0.3 ... 0.95
_OUTPUT_FIELDS = ("existence_logits", "class_logits", "start_logits", "end_logits", "region_logits", "query_types")


def threshold_field(config) -> str:
    """The config field the head decodes with: ``existence_threshold`` or ``softmax_threshold``."""
    return "existence_threshold" if config.head_mode == "existence" else "softmax_threshold"


@torch.no_grad()
def dev_outputs(model, dataset, collator, batch_size: int, device=None) -> List[Any]:
    """Run ``model`` once over ``dataset``: per batch ``(outputs on the CPU, batch on the CPU, ids)``."""
    model.eval()
    device = device or next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    ids = iter(dataset["id"])
    kept = []
    for batch in loader:
        outputs = model(**select_model_inputs(batch.to(device), with_labels=False))
        fields = {name: getattr(outputs, name).detach().cpu() for name in _OUTPUT_FIELDS if getattr(outputs, name, None) is not None}
        kept.append((fields, batch.to("cpu"), [next(ids) for _ in range(batch["word_mask"].shape[0])]))
    return kept


def decode_at(processor, kept, config, threshold) -> List[Dict[str, Any]]:
    """The evaluation-JSONL predictions of ``kept`` (``dev_outputs``) decoded at ``threshold``."""
    rows = []
    for fields, batch, ids in kept:
        entities = processor.post_process_grounded_ner(fields, batch, config=config, threshold=threshold)
        rows.extend({"id": row_id, "entities": tweet} for row_id, tweet in zip(ids, entities))
    return rows


def calibrate_threshold(model, processor, dataset, collator, batch_size: int, references, task: str = "gmner",
                        grid: Optional[Sequence[Optional[float]]] = None, outputs=None,
                        study_folds: Sequence[int] = (), study_seeds: Sequence[int] = ()) -> Dict[str, Any]:
    """Choose the decision threshold of ``model`` on ``dataset`` by the official ``task`` F1.

    ``outputs``: ``dev_outputs(model, dataset, collator, batch_size)`` when the caller already has them (the model
    then does not run again).

    Returns ``{"field", "task", "default", "default_f1", "chosen", "chosen_f1", "f1_by_threshold",
    "cross_fitted_f1", "cross_fitted_thresholds"}`` (F1 in [0, 1]; ``default`` is the config's current value;
    ``cross_fitted_f1``: see ``cross_fitted``, two folds dealt by position). Does not change the model's config.

    ``study_folds`` (e.g. ``(2, 5, 10)``) adds ``"cross_fitted_study"``: for each fold count, the cross-fitted F1
    with tweets dealt by position and, for each of ``study_seeds``, dealt at random (``cross_fitted``'s
    ``seed``); a list of ``{"folds", "seed" (None: by position), "f1", "chosen"}``. With fewer folds each threshold
    is chosen on less of the split than the saved one (chosen on all of it), so the estimate is more pessimistic;
    the random deals show how much one deal of the tweets moves it.
    """
    config = model.config
    field = threshold_field(config)
    default = getattr(config, field)
    if grid is None:
        grid = EXISTENCE_GRID if field == "existence_threshold" else SOFTMAX_GRID
    candidates = list(dict.fromkeys([default, *grid]))
    kept = dev_outputs(model, dataset, collator, batch_size) if outputs is None else outputs
    # The softmax head decodes with the given threshold, or its config value when None is passed: score None as
    # "no threshold" by a threshold of 0, which keeps every non-∅ argmax.
    decoded = {threshold: decode_at(processor, kept, config, 0.0 if threshold is None else threshold)
               for threshold in candidates}
    return {"field": field, "task": task,
            **choose_threshold(decoded, references, task, default, study_folds=study_folds, study_seeds=study_seeds)}


def choose_threshold(decoded, references, task: str, default, study_folds: Sequence[int] = (),
                     study_seeds: Sequence[int] = ()) -> Dict[str, Any]:
    """The threshold with the best official ``task`` F1 among the keys of ``decoded`` (threshold → evaluation rows of
    the whole split decoded at it; ``default`` must be one of them), ties to the one closest to ``default`` (None
    counts as 0). Whatever the decoder: ``calibrate_threshold`` passes MQSPN's decodings, bench/mner_real.py the BIO
    tagger's.

    Returns ``{"default", "default_f1", "chosen", "chosen_f1", "f1_by_threshold", "cross_fitted_f1",
    "cross_fitted_thresholds"}`` and, with ``study_folds``, ``"cross_fitted_study"`` (``calibrate_threshold``)."""
    candidates = list(decoded)
    if default not in decoded:
        raise ValueError(f"the default threshold {default!r} is not among the decoded ones {candidates}")
    scores = {threshold: evaluate_grounded_ner(rows, references)[task]["f1"] for threshold, rows in decoded.items()}

    def closeness(threshold):
        return abs((0.0 if threshold is None else threshold) - (0.0 if default is None else default))

    def best_of(f1_by_threshold):
        return max(candidates, key=lambda t: (round(f1_by_threshold[t], 10), -closeness(t)))

    chosen = best_of(scores)

    def best_on(subset):
        return best_of({threshold: f1_on(rows, subset, task) for threshold, rows in decoded.items()})

    held_out = cross_fitted(references, task, best_on, decoded.__getitem__)
    result = {"default": default, "default_f1": scores[default], "chosen": chosen,
              "chosen_f1": scores[chosen], "f1_by_threshold": {str(t): scores[t] for t in candidates},
              "cross_fitted_f1": held_out["f1"], "cross_fitted_thresholds": held_out["chosen"]}
    if study_folds:
        result["cross_fitted_study"] = [
            {"folds": folds, "seed": seed,
             **cross_fitted(references, task, best_on, decoded.__getitem__, folds=folds, seed=seed)}
            for folds in study_folds for seed in (None, *study_seeds)
        ]
    return result


def f1_on(rows, subset, task: str) -> float:
    """The official ``task`` F1 of the prediction ``rows`` (a whole split's) on the tweets of ``subset``
    (references)."""
    wanted = {row["id"] for row in subset}
    return evaluate_grounded_ner([row for row in rows if row["id"] in wanted], subset)[task]["f1"]


def cross_fitted(references, task: str, choose, decode, folds: int = 2, seed: Optional[int] = None) -> Dict[str, Any]:
    """An estimate of a calibrated F1 on tweets the calibration did not see (a threshold chosen and scored on the
    same split is optimistic). The split's tweets (``references``) are dealt into ``folds`` folds by position
    (with ``seed``: in the order of a shuffle seeded with it); each fold is decoded at ``choose(the other folds'
    references)`` with ``decode(choice)`` (evaluation rows of the whole split) and the pooled predictions are
    scored on the whole split with the official ``task`` F1.

    Returns ``{"f1", "chosen"}`` (one choice per fold), both None when a fold would leave nothing to choose on."""
    order = list(references)
    if seed is not None:
        random.Random(seed).shuffle(order)
    fold_of = {row["id"]: index % folds for index, row in enumerate(order)}
    pooled, chosen = [], []
    for fold in range(folds):
        others = [row for row in references if fold_of[row["id"]] != fold]
        if not others:
            return {"f1": None, "chosen": None}
        choice = choose(others)
        chosen.append(choice)
        pooled.extend(row for row in decode(choice) if fold_of[row["id"]] == fold)
    return {"f1": evaluate_grounded_ner(pooled, references)[task]["f1"], "chosen": chosen}


def calibrate_best_checkpoint(output_dir: str, processor, dataset, collator, batch_size: int, references,
                              task: str = "gmner", device=None) -> Dict[str, Any]:
    """Calibrate the threshold of ``output_dir/best`` on ``dataset`` (dev), write the chosen value into its
    config (the folder is rewritten whole through ``best.partial``, never half-written) and add the
    calibration to ``output_dir/dev_results.json`` as ``"threshold_calibration"``. Returns the calibration."""
    import json
    import os

    from ..modeling_mqspn import MQSPNForGroundedNER
    from .export import save_checkpoint
    from .training import replace_folder, write_text_atomically

    best_dir = os.path.join(output_dir, "best")
    model = MQSPNForGroundedNER.from_pretrained(best_dir)
    if device is not None:
        model.to(device)
    calibration = calibrate_threshold(model, processor, dataset, collator, batch_size, references, task=task)
    setattr(model.config, calibration["field"], calibration["chosen"])
    save_checkpoint(model, processor, best_dir + ".partial")
    replace_folder(best_dir + ".partial", best_dir)
    results_path = os.path.join(output_dir, "dev_results.json")
    with open(results_path, encoding="utf-8") as handle:
        results = json.load(handle)
    results["threshold_calibration"] = calibration
    write_text_atomically(results_path, json.dumps(results, indent=2))
    return calibration
