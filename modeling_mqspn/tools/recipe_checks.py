"""Checks of a recipe against its data before the first training step (docs/DEVIATIONS.md, "Per-type query
counts" and "Entities no proposal covers"): per-type query counts sized from the training split, the whole
training split checked against the model's query capacity (one clear error instead of a crash mid-run), the
recall ceiling that too few queries impose on dev / test, and the count of groundable entities whose boxes
no proposal covers.

Used by ``examples/train.py``; rows are the readers' dataset rows (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Mapping, MutableMapping, Optional, Sequence

from ..box_ops import box_iou
from ..configuration_mqspn import MQSPNConfig

__all__ = [
    "FROM_DATA",
    "capacity_of",
    "check_query_capacity",
    "count_uncovered",
    "over_capacity",
    "resolve_type_query_counts",
    "tiled_counts",
    "worst_tweet_counts",
]

FROM_DATA = "from_data"


def worst_tweet_counts(rows_entities: Sequence[Sequence[Mapping[str, Any]]], entity_types: Sequence[str]) -> Dict[str, int]:
    """The most gold entities of each type that one tweet holds, keyed by type name (0 for a type never seen)."""
    worst = {name: 0 for name in entity_types}
    for entities in rows_entities:
        for name, count in Counter(entity["type"] for entity in entities).items():
            if name in worst and count > worst[name]:
                worst[name] = count
    return worst


def tiled_counts(num_queries: int, num_types: int) -> List[int]:
    """How many queries each type gets when u queries are tiled over p types (query i has type i mod p)."""
    return [len(range(t, num_queries, num_types)) for t in range(num_types)]


def resolve_type_query_counts(model_config: MutableMapping[str, Any], train_entities, entity_types: Sequence[str]) -> Optional[List[int]]:
    """``"type_query_counts": "from_data"`` in a recipe's ``model_config``: every type keeps at least its tiled
    share of ``num_queries`` (default 60) and gets as many queries as its worst training tweet needs; writes the
    counts and their sum (``num_queries``) into ``model_config`` and returns the counts (None when the recipe
    gives explicit counts or none)."""
    if model_config.get("type_query_counts") != FROM_DATA:
        return None
    base = tiled_counts(int(model_config.get("num_queries") or 60), len(entity_types))
    worst = worst_tweet_counts(train_entities, entity_types)
    counts = [max(share, worst[name]) for share, name in zip(base, entity_types)]
    model_config["type_query_counts"] = counts
    model_config["num_queries"] = sum(counts)
    grown = {name: count for name, count, share in zip(entity_types, counts, base) if count > share}
    print(f"type_query_counts from the training split: {sum(counts)} queries (tiled share {base[0]} per type"
          + (f"; more for {grown})" if grown else ")"))
    return counts


def capacity_of(config: MQSPNConfig) -> Optional[Dict[str, int]]:
    """Queries per type in existence mode; None in softmax mode (any query takes any type)."""
    return dict(config.queries_per_type) if config.head_mode == "existence" else None


def over_capacity(row_ids, rows_entities, config: MQSPNConfig) -> List[Dict[str, Any]]:
    """The tweets with more gold entities (of a type, in existence mode) than queries for them:
    ``[{"id", "type" (None in softmax mode), "entities", "queries"}]``."""
    capacity = capacity_of(config)
    found = []
    for row_id, entities in zip(row_ids, rows_entities):
        if capacity is None:
            if len(entities) > config.num_queries:
                found.append({"id": row_id, "type": None, "entities": len(entities), "queries": config.num_queries})
            continue
        for name, count in sorted(Counter(entity["type"] for entity in entities).items()):
            if count > capacity.get(name, 0):
                found.append({"id": row_id, "type": name, "entities": count, "queries": capacity.get(name, 0)})
    return found


def check_query_capacity(splits: Mapping[str, Any], config: MQSPNConfig) -> Dict[str, Any]:
    """Check every split against the model's queries before the first step.

    The training split must fit: otherwise one ``ValueError`` names the tweets (up to 10, and how many), the
    queries each type would need and the ``type_query_counts`` / ``num_queries`` that fit the whole split.
    Dev / test tweets over capacity are counted: the entities beyond the queries can never be predicted, so
    the split's recall is at most ``recall_ceiling``. Returns ``{split: {"tweets_over", "entities_lost",
    "gold_entities", "recall_ceiling"}}`` for the evaluation splits.
    """
    train = splits["train"]
    problems = over_capacity(train["id"], train["entities"], config)
    if problems:
        shown = ", ".join(
            f"{p['id']!r} ({p['entities']} {p['type'] or 'entities'} for {p['queries']} queries)" for p in problems[:10]
        )
        if config.head_mode == "existence":
            worst = worst_tweet_counts(train["entities"], config.entity_types)
            needed = [max(config.queries_per_type[name], worst[name]) for name in config.entity_types]
            fix = (f"set model_config.type_query_counts to {needed} (num_queries {sum(needed)}), or "
                   f"\"type_query_counts\": \"{FROM_DATA}\" to size them from the training split")
        else:
            fix = f"raise num_queries to at least {max(p['entities'] for p in problems)}"
        raise ValueError(
            f"{len(problems)} training tweet(s) hold more gold entities than the model has queries for them "
            f"(num_queries={config.num_queries}, queries per type {config.queries_per_type}): {shown}"
            + (" ..." if len(problems) > 10 else "") + f". Training would stop at the first batch holding one: {fix}."
        )
    report = {}
    for split, dataset in splits.items():
        if split == "train":
            continue
        found = over_capacity(dataset["id"], dataset["entities"], config)
        gold = sum(len(entities) for entities in dataset["entities"])
        lost = sum(p["entities"] - p["queries"] for p in found)
        report[split] = {"tweets_over": len({p["id"] for p in found}), "entities_lost": lost, "gold_entities": gold,
                         "recall_ceiling": 1.0 - lost / gold if gold else 1.0}
        if found:
            print(f"{split}: {report[split]['tweets_over']} tweet(s) hold more entities of a type than its queries; "
                  f"{lost} of {gold} gold entities can never be predicted (recall ceiling "
                  f"{100 * report[split]['recall_ceiling']:.2f}%)")
    return report


def count_uncovered(dataset, max_regions: int, iou_threshold: float = 0.5) -> Dict[str, int]:
    """Groundable gold entities (with boxes) of which no proposal among the first ``max_regions`` reaches
    ``iou_threshold`` with a box, as the processor labels them (``uncovered``): ``{"groundable", "uncovered"}``."""
    groundable = uncovered = 0
    for entities, proposals in zip(dataset["entities"], dataset["proposals"]):
        kept = list(proposals)[:max_regions]
        for entity in entities:
            boxes = entity.get("boxes") or []
            if not boxes:
                continue
            groundable += 1
            if not any(box_iou(proposal, box) >= iou_threshold for proposal in kept for box in boxes):
                uncovered += 1
    return {"groundable": groundable, "uncovered": uncovered}
