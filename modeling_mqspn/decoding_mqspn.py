"""Decoding MQSPN's set predictions into entities (docs/DESIGN.md §7; the paper's one-time inference of
Figure 1 (c) leaves the decoding rule open).

For every query of every tweet, all at once on the outputs' device:

1. keep the query when its existence probability P^c = σ(existence logit) ≥ threshold, its type
   being ``query_types[i]``; with the softmax head, when the argmax class is not ∅ (class 0), its
   type being argmax − 1 and P^c the argmax probability;
2. span = the (s, e) over the tweet's valid words with s ≤ e and e − s + 1 ≤ ``max_span_words``
   maximising P^s[s] · P^e[e] (per-word sigmoids, or one softmax over the words with
   ``config.boundary_activation="softmax"``);
3. region = argmax of P^r over the valid regions (0 = no region, k ≥ 1 = the k-th proposal);
4. score = P^c · sqrt(P^s[s] · P^e[e]): the existence probability times the geometric mean of the
   two boundary probabilities, so a confident query with a vague span ranks below one sure of
   both; region_score = P^r[region] is reported separately (the region does not decide whether
   an entity is kept).

Then, per tweet, by descending score (ties: lower query index first), a prediction is kept only
if its span overlaps no kept one: GMNER spans are flat. The authors' code sorted by region slot
here (docs/DESIGN.md §10.5); we sort by score.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F

from .interface_mqspn import boundary_activation_of, boundary_probabilities, head_mode_of

__all__ = ["decode_predictions"]

_FIELDS = ("existence_logits", "class_logits", "start_logits", "end_logits", "region_logits", "query_types")


def _fields(outputs: Any) -> Dict[str, Optional[torch.Tensor]]:
    """The logits of ``outputs``: an ``MQSPNOutput`` (a ``ModelOutput``, whose unset fields are
    absent) or a plain dict with the same names."""
    if isinstance(outputs, Mapping):
        return {name: outputs.get(name) for name in _FIELDS}
    return {name: getattr(outputs, name, None) for name in _FIELDS}


@torch.no_grad()
def decode_predictions(
    outputs: Any,
    config,
    word_mask: torch.Tensor,
    region_mask: torch.Tensor,
    threshold: Optional[float] = None,
) -> List[List[Dict[str, Any]]]:
    """Turn the final layer's logits into per-tweet entity predictions (docs/DESIGN.md §7).

    Args:
        outputs: ``MQSPNOutput`` or dict with ``existence_logits`` (B, u) or ``class_logits``
            (B, u, p+1), ``start_logits`` / ``end_logits`` (B, u, n), ``region_logits`` (B, u, K+1)
            and, for the existence head, ``query_types`` (u,) (default: query i has type i mod p).
        config: reads ``entity_types``, ``existence_threshold`` and ``max_span_words``.
        word_mask: (B, n) real words. region_mask: (B, K) real proposals.
        threshold: minimum P^c. Default: ``config.existence_threshold`` for the existence head; the
            softmax head keeps every query whose argmax is not ∅ whose probability reaches
            ``config.softmax_threshold`` (None: every one).

    Returns:
        For each tweet, a list of ``{"start", "end" (inclusive word indices), "type" (str),
        "type_id", "region" (0 = none, else the 1-based proposal index), "score",
        "region_score"}``, ordered by start.
    """
    fields = _fields(outputs)
    mode = head_mode_of(fields)
    entity_types = list(config.entity_types)
    activation = boundary_activation_of(config)
    start_prob = boundary_probabilities(fields["start_logits"].float(), activation)  # (B, u, n)
    end_prob = boundary_probabilities(fields["end_logits"].float(), activation)  # (B, u, n)
    region_prob = fields["region_logits"].float().sigmoid()  # (B, u, K+1)
    device = start_prob.device
    batch, queries, num_words = start_prob.shape

    if mode == "existence":
        class_prob = fields["existence_logits"].float().sigmoid()  # (B, u)
        query_types = fields["query_types"]
        if query_types is None:
            query_types = torch.arange(queries, device=device) % len(entity_types)
        type_id = query_types.to(device).long()[None, :].expand(batch, queries)  # (B, u)
        keep = class_prob >= (config.existence_threshold if threshold is None else threshold)
    else:
        class_prob, best_class = fields["class_logits"].float().softmax(-1).max(-1)  # (B, u) each
        type_id = best_class - 1
        keep = best_class != 0
        if threshold is None:
            threshold = getattr(config, "softmax_threshold", None)
        if threshold is not None:
            keep = keep & (class_prob >= threshold)

    if num_words == 0:
        return [[] for _ in range(batch)]
    # Candidate spans as (start s, width d) with e = s + d, d < max_span_words: (B, u, n, W).
    width = config.max_span_words
    words = word_mask.to(device).bool()  # (B, n)
    end_words = F.pad(words, (0, width - 1)).unfold(-1, width, 1)  # (B, n, W): words[s + d]
    allowed = words[:, :, None] & end_words  # (B, n, W): both ends on real words (so s ≤ e < n)
    end_at = F.pad(end_prob, (0, width - 1)).unfold(-1, width, 1)  # (B, u, n, W): P^e[s + d]
    span_prob = (start_prob[:, :, :, None] * end_at).masked_fill(~allowed[:, None], -1.0)  # (B, u, n, W)
    best_span_prob, best_span = span_prob.flatten(2).max(-1)  # (B, u)
    keep = keep & (best_span_prob >= 0)  # a tweet without words has no span
    start = best_span // width
    end = start + best_span % width

    valid_regions = torch.cat(
        [torch.ones(batch, 1, dtype=torch.bool, device=device), region_mask.to(device).bool()], dim=1
    )  # (B, K+1)
    region_score, region = region_prob.masked_fill(~valid_regions[:, None, :], -1.0).max(-1)  # (B, u)
    score = class_prob * best_span_prob.clamp(min=0).sqrt()  # (B, u)

    table = torch.stack(
        [keep.float(), start.float(), end.float(), type_id.float(), region.float(), score, region_score], dim=-1
    ).cpu()  # (B, u, 7), the only transfer

    predictions: List[List[Dict[str, Any]]] = []
    for rows in table.tolist():
        candidates = sorted(
            (row for row in rows if row[0] > 0), key=lambda row: -row[5]
        )  # sorted() is stable: equal scores keep query order
        kept: List[Dict[str, Any]] = []
        for _, s, e, t, r, sc, rs in candidates:
            s, e = int(s), int(e)
            if any(s <= other["end"] and other["start"] <= e for other in kept):
                continue
            kept.append(
                {
                    "start": s,
                    "end": e,
                    "type": entity_types[int(t)],
                    "type_id": int(t),
                    "region": int(r),
                    "score": sc,
                    "region_score": rs,
                }
            )
        predictions.append(sorted(kept, key=lambda entity: entity["start"]))
    return predictions
