"""Bipartite matching and the set-prediction loss of MQSPN (paper: "Bipartite Matching Loss";
docs/DESIGN.md §5).

The matcher pairs each gold entity j = (s_j, e_j, t_j, R_j) of a tweet with one query i by
minimising, with the Hungarian algorithm, the summed pair cost

    C_ij = −[w_c · p^c_i(t_j) + w_s · P^s_i[s_j] + w_e · P^e_i[e_j] + w_r · max_{r ∈ R_j} P^r_i[r]]

(the paper's L_cost, with configurable weights and a multi-hot region target R_j). Queries left
unmatched are assigned ∅. The loss (the paper's L(Y, Ŷ)) is then a classification term on every
query plus boundary and region terms on the matched queries, normalised by the number of gold
targets in the batch across all processes.

Two classification heads exist (docs/DESIGN.md §4):

* ``existence`` — one logit per query; query i has the entity type ``query_types[i]`` and its
  P^c_i says whether it found an entity of that type. p^c_i(t) = P^c_i when query_types[i] == t;
  a query of another type may never be matched to that entity.
* ``softmax`` — (p + 1)-way logits per query; class 0 is ∅ and entity type t is class t + 1.

The head in use is read from the tensors: a layer dict holds ``existence_logits`` or
``class_logits`` (ARCHITECTURE.md, "Matching and loss").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import is_scipy_available, requires_backends

from .interface_mqspn import boundary_activation_of, boundary_probabilities, head_mode_of, masked_fill_logits

__all__ = [
    "FORBIDDEN_COST",
    "HungarianMatcher",
    "MQSPNLoss",
    "MatchIndices",
    "MatchTargets",
    "boundary_targets",
    "fixed_assignment",
    "loss_normaliser",
    "num_targets_across_processes",
    "prepare_targets",
    "tensors_to_host",
]

if is_scipy_available():
    from scipy.optimize import linear_sum_assignment

# A forbidden (query, entity) pair costs this much: far above any real assignment, whose cost
# magnitude is at most sum(|w|) per pair, yet finite so that linear_sum_assignment stays feasible.
FORBIDDEN_COST = 1.0e6

MatchIndices = List[Tuple[torch.Tensor, torch.Tensor]]


def _sample_name(label: Mapping, index: int) -> str:
    sample_id = label.get("id")
    return f"sample {sample_id!r} (batch index {index})" if sample_id is not None else f"batch index {index}"


@dataclass
class MatchTargets:
    """The gold targets of a batch, validated, tiled and padded for matching and the loss.

    ``tiled[b]`` lists, for each target of tweet b, the index of the gold entity it copies
    (equal to ``arange(m_b)`` unless ``gold_repeat`` tiles the gold set). The padded tensors live
    on the model's device; column c of tweet b is target c, valid for c < ``num_targets[b]``.
    """

    tiled: List[torch.Tensor]  # B × (T_b,) long, CPU: gold index of each target
    num_targets: List[int]  # B × T_b
    start: torch.Tensor  # (B, M) long, M = max T_b
    end: torch.Tensor  # (B, M) long
    type: torch.Tensor  # (B, M) long, index into config.entity_types
    regions: torch.Tensor  # (B, M, K+1) bool, multi-hot R_j
    types_cpu: torch.Tensor  # (B, M) long, CPU copy of ``type``
    uncovered: Optional[torch.Tensor] = None  # (B, M) bool: groundable, but no proposal covers its boxes

    @property
    def total(self) -> int:
        return sum(self.num_targets)


def tensors_to_host(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """CPU copies of ``tensors`` (integer or bool, any shapes) in one device-to-host transfer: on an
    accelerator each ``.cpu()`` waits for the device's queue, so the labels of a batch (four tensors a
    tweet) and its masks travel together. CPU tensors are returned as they are."""
    tensors = [torch.as_tensor(t).detach() for t in tensors]
    if all(t.device.type == "cpu" for t in tensors):
        return tensors
    device = next(t.device for t in tensors if t.device.type != "cpu")
    flat = torch.cat([t.to(device).reshape(-1).long() for t in tensors]).cpu()  # the one transfer
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset:offset + t.numel()].reshape(t.shape).to(t.dtype))
        offset += t.numel()
    return out


def _tile_gold(
    order: Sequence[int],
    types: Sequence[int],
    capacity: Optional[Dict[int, int]],
    total_queries: int,
    gold_repeat: int,
) -> List[int]:
    """Cycle through the gold entities in ``order`` until ``gold_repeat`` targets exist.

    Never drops a gold entity (the result has at least one copy of each). A copy is added only while
    queries remain for it: ``capacity[t]`` queries of type t in existence mode, ``total_queries``
    in softmax mode (``capacity`` None). Without ``gold_repeat`` the result is ``order`` itself.
    """
    targets = list(order)
    if gold_repeat <= len(targets) or not targets:
        return targets
    used: Dict[int, int] = {}
    for j in targets:
        used[types[j]] = used.get(types[j], 0) + 1
    while len(targets) < gold_repeat:
        added = False
        for j in order:
            if len(targets) >= gold_repeat:
                break
            if capacity is None:
                if len(targets) >= total_queries:
                    break
            elif used[types[j]] >= capacity.get(types[j], 0):
                continue
            targets.append(j)
            used[types[j]] += 1
            added = True
        if not added:
            break
    return targets


def prepare_targets(
    labels: Sequence[Mapping[str, torch.Tensor]],
    word_mask: torch.Tensor,
    region_mask: torch.Tensor,
    query_types: Optional[torch.Tensor],
    num_queries: int,
    num_types: int,
    head_mode: str,
    gold_repeat: int = 0,
    sort_by_start: bool = False,
    device: Optional[torch.device] = None,
) -> MatchTargets:
    """Validate ``labels`` (ARCHITECTURE.md "Model inputs"), tile them and pad them for the batch.

    Args:
        labels: B dicts with ``start``, ``end``, ``type`` ((m,) long), ``regions`` ((m, K'+1) bool,
            K' ≤ K; missing trailing columns count as False) and optionally ``id`` and ``uncovered``
            ((m,) bool: the entity has gold boxes but no proposal covers them; its ``regions`` is column 0).
        word_mask: (B, n) valid words. region_mask: (B, K) valid proposals.
        query_types: (u,) entity type of each query; required in existence mode.
        gold_repeat: tile each tweet's gold set cyclically up to this many targets (0 = off).
        sort_by_start: order each tweet's targets by (start, end) — the w/o-BML assignment.

    Raises:
        ValueError naming the sample when an entity lies outside the valid words, has an unknown
        type or an invalid region, or when a tweet has more entities (of a type, in existence mode)
        than there are queries for them.
    """
    if len(labels) != word_mask.shape[0]:
        raise ValueError(f"Got {len(labels)} label dicts for a batch of {word_mask.shape[0]} tweets.")
    device = word_mask.device if device is None else device
    num_regions = region_mask.shape[1] + 1  # K + 1, column 0 = no region
    keys = ("start", "end", "type", "regions")
    host = tensors_to_host(
        [word_mask, region_mask, query_types if query_types is not None else torch.zeros(0, dtype=torch.long)]
        + [label[key] for label in labels if all(k in label for k in keys) for key in keys]
    )
    words_cpu, regions_cpu, types_of_queries, host = host[0].bool(), host[1].bool(), host[2], iter(host[3:])
    labels = [dict(label, **{key: next(host) for key in keys}) if all(k in label for k in keys) else label
              for label in labels]
    regions_valid = torch.cat([torch.ones(region_mask.shape[0], 1, dtype=torch.bool), regions_cpu], dim=1)  # (B, K+1)

    capacity: Optional[Dict[int, int]] = None
    if head_mode == "existence":
        if query_types is None:
            raise ValueError("query_types is required by the existence head (query i has type query_types[i]).")
        counts = torch.bincount(types_of_queries.long(), minlength=num_types)
        capacity = {t: int(c) for t, c in enumerate(counts.tolist())}

    gold_cpu = []
    tiled: List[torch.Tensor] = []
    for b, label in enumerate(labels):
        name = _sample_name(label, b)
        missing = [key for key in ("start", "end", "type", "regions") if key not in label]
        if missing:
            raise ValueError(f"labels for {name} lack the keys {missing} (ARCHITECTURE.md, Model inputs).")
        start = torch.as_tensor(label["start"]).detach().long().cpu().reshape(-1)
        end = torch.as_tensor(label["end"]).detach().long().cpu().reshape(-1)
        etype = torch.as_tensor(label["type"]).detach().long().cpu().reshape(-1)
        regions = torch.as_tensor(label["regions"]).detach().bool().cpu()
        m = start.numel()
        if regions.dim() == 1 and m == 0:
            regions = regions.reshape(0, num_regions)
        if end.numel() != m or etype.numel() != m or regions.dim() != 2 or regions.shape[0] != m:
            raise ValueError(
                f"labels for {name}: start, end, type must have the same length m and regions the shape "
                f"(m, K+1); got {m}, {end.numel()}, {etype.numel()} and {tuple(regions.shape)}."
            )
        if regions.shape[1] > num_regions:
            raise ValueError(
                f"labels for {name}: regions has {regions.shape[1]} columns but the batch has only "
                f"{num_regions - 1} proposals (+1 for 'no region'); build labels from the same proposals."
            )
        regions = F.pad(regions, (0, num_regions - regions.shape[1]))  # (m, K+1)
        uncovered = label.get("uncovered")
        uncovered = (torch.zeros(m, dtype=torch.bool) if uncovered is None
                     else torch.as_tensor(uncovered).detach().bool().cpu().reshape(-1))
        if uncovered.numel() != m:
            raise ValueError(f"labels for {name}: 'uncovered' has {uncovered.numel()} entries for {m} entities.")
        n_words = words_cpu.shape[1]
        for j in range(m):
            s, e, t = int(start[j]), int(end[j]), int(etype[j])
            if not (0 <= s <= e < n_words) or not (words_cpu[b, s] and words_cpu[b, e]):
                raise ValueError(
                    f"labels for {name}: entity {j} has span ({s}, {e}), which is not a valid inclusive "
                    f"span of the tweet's {int(words_cpu[b].sum())} words."
                )
            if not 0 <= t < num_types:
                raise ValueError(f"labels for {name}: entity {j} has type {t}, outside 0..{num_types - 1}.")
            if not regions[j].any():
                raise ValueError(
                    f"labels for {name}: entity {j} has no region set; set column 0 for an entity "
                    "without a covering proposal."
                )
            if (regions[j] & ~regions_valid[b]).any():
                raise ValueError(
                    f"labels for {name}: entity {j} points at padding proposals "
                    f"{torch.nonzero(regions[j] & ~regions_valid[b]).flatten().tolist()}."
                )
        types_list = etype.tolist()
        if capacity is not None:
            for t in sorted(set(types_list)):
                if types_list.count(t) > capacity[t]:
                    raise ValueError(
                        f"{name} has {types_list.count(t)} gold entities of type {t} but only {capacity[t]} "
                        f"queries of that type (num_queries={num_queries}); raise num_queries so that every "
                        "type has enough queries."
                    )
        elif m > num_queries:
            raise ValueError(
                f"{name} has {m} gold entities but only num_queries={num_queries} queries; raise num_queries."
            )
        order = list(range(m))
        if sort_by_start:
            order.sort(key=lambda j: (int(start[j]), int(end[j]), j))
        tiled.append(torch.tensor(_tile_gold(order, types_list, capacity, num_queries, gold_repeat), dtype=torch.long))
        gold_cpu.append((start, end, etype, regions, uncovered))

    num_targets = [int(t.numel()) for t in tiled]
    width = max(num_targets, default=0)
    batch = len(labels)
    pad_start = torch.zeros(batch, width, dtype=torch.long)
    pad_end = torch.zeros(batch, width, dtype=torch.long)
    pad_type = torch.zeros(batch, width, dtype=torch.long)
    pad_regions = torch.zeros(batch, width, num_regions, dtype=torch.bool)
    pad_regions[:, :, 0] = True  # padding targets point at "no region": every column set is valid
    pad_uncovered = torch.zeros(batch, width, dtype=torch.bool)
    for b, ((start, end, etype, regions, uncovered), index) in enumerate(zip(gold_cpu, tiled)):
        count = index.numel()
        pad_start[b, :count] = start[index]
        pad_end[b, :count] = end[index]
        pad_type[b, :count] = etype[index]
        pad_regions[b, :count] = regions[index]
        pad_uncovered[b, :count] = uncovered[index]
    # non_blocking: a copy from (pageable) host memory is safe and does not wait for the device's queue.
    return MatchTargets(
        tiled=tiled,
        num_targets=num_targets,
        start=pad_start.to(device, non_blocking=True),
        end=pad_end.to(device, non_blocking=True),
        type=pad_type.to(device, non_blocking=True),
        regions=pad_regions.to(device, non_blocking=True),
        types_cpu=pad_type,
        uncovered=pad_uncovered.to(device, non_blocking=True),
    )


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment of queries to gold entities (paper: Bipartite Matching Loss,
    the arg-min over permutations; docs/DESIGN.md §5), solved by the Hungarian algorithm per tweet.

    The cost of every (query, target) pair of the whole batch is one tensor expression on the
    model's device, moved to the CPU once; ``scipy.optimize.linear_sum_assignment`` then solves one
    tweet at a time. Weights: ``config.match_cost_{class,start,end,region}``.
    """

    def __init__(self, config):
        super().__init__()
        requires_backends(self, ["scipy"])  # the Hungarian algorithm is scipy's linear_sum_assignment
        self.num_types = len(config.entity_types)
        self.num_queries = config.num_queries
        self.gold_repeat = config.gold_repeat
        self.cost_class = config.match_cost_class
        self.cost_start = config.match_cost_start
        self.cost_end = config.match_cost_end
        self.cost_region = config.match_cost_region
        self.ignore_uncovered = getattr(config, "uncovered_region_target", "ignore") == "ignore"
        self.boundary_activation = boundary_activation_of(config)

    @torch.no_grad()
    def cost_matrix(
        self, layer: Mapping[str, torch.Tensor], targets: MatchTargets, query_types: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """(B, u, M) matching cost on the logits' device; forbidden pairs cost ``FORBIDDEN_COST``."""
        start_prob = boundary_probabilities(layer["start_logits"].float(), self.boundary_activation)  # (B, u, n)
        end_prob = boundary_probabilities(layer["end_logits"].float(), self.boundary_activation)  # (B, u, n)
        region_prob = layer["region_logits"].float().sigmoid()  # (B, u, K+1)
        batch, queries, _ = start_prob.shape
        width = targets.start.shape[1]

        cost_start = start_prob.gather(2, targets.start[:, None, :].expand(batch, queries, width))  # (B, u, M)
        cost_end = end_prob.gather(2, targets.end[:, None, :].expand(batch, queries, width))  # (B, u, M)
        # max over r ∈ R_j of P^r_i[r]; probabilities are ≥ 0 and R_j is non-empty, so a 0/1 product works.
        cost_region = (region_prob[:, :, None, :] * targets.regions[:, None, :, :]).amax(-1)  # (B, u, M)
        if self.ignore_uncovered and targets.uncovered is not None:
            # an entity no proposal covers has no right region among the candidates: no region term
            cost_region = cost_region.masked_fill(targets.uncovered[:, None, :], 0.0)

        forbidden = None
        if head_mode_of(layer) == "existence":
            cost_class = layer["existence_logits"].float().sigmoid()[:, :, None].expand(batch, queries, width)
            forbidden = query_types.to(targets.type.device)[None, :, None] != targets.type[:, None, :]  # (B, u, M)
        else:
            class_prob = layer["class_logits"].float().softmax(-1)  # (B, u, p+1), class 0 = ∅
            cost_class = class_prob.gather(2, (targets.type + 1)[:, None, :].expand(batch, queries, width))

        cost = -(
            self.cost_class * cost_class
            + self.cost_start * cost_start
            + self.cost_end * cost_end
            + self.cost_region * cost_region
        )
        if forbidden is not None:
            cost = cost.masked_fill(forbidden, FORBIDDEN_COST)
        return cost

    @torch.no_grad()
    def match_targets(
        self, layer: Mapping[str, torch.Tensor], targets: MatchTargets, query_types: Optional[torch.Tensor]
    ) -> MatchIndices:
        """Per tweet ``(query_indices, target_columns)``: columns index ``targets``, not the gold list."""
        if targets.total == 0:
            empty = torch.zeros(0, dtype=torch.long)
            return [(empty, empty) for _ in targets.num_targets]
        return self.match_layers([layer], targets, query_types)[0]

    @torch.no_grad()
    def match_layers(
        self, layers: Sequence[Mapping[str, torch.Tensor]], targets: MatchTargets, query_types: Optional[torch.Tensor]
    ) -> List[MatchIndices]:
        """``match_targets`` for several layers (the QFNet layers of one batch): every layer's cost goes to
        the CPU in one transfer (L, B, u, M), then the Hungarian algorithm runs per layer and tweet."""
        if targets.total == 0:
            empty = torch.zeros(0, dtype=torch.long)
            return [[(empty, empty) for _ in targets.num_targets] for _ in layers]
        costs = torch.stack([self.cost_matrix(layer, targets, query_types) for layer in layers]).cpu()
        matched = []
        for cost in costs:
            indices = []
            for b, count in enumerate(targets.num_targets):
                rows, cols = linear_sum_assignment(cost[b, :, :count].numpy())
                indices.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
            matched.append(indices)
        return matched

    @torch.no_grad()
    def forward(
        self,
        layer: Mapping[str, torch.Tensor],
        labels: Sequence[Mapping[str, torch.Tensor]],
        word_mask: torch.Tensor,
        region_mask: torch.Tensor,
        query_types: Optional[torch.Tensor],
    ) -> MatchIndices:
        """Match one layer's predictions to the gold entities.

        Args:
            layer: ``existence_logits`` (B, u) or ``class_logits`` (B, u, p+1), ``start_logits`` and
                ``end_logits`` (B, u, n), ``region_logits`` (B, u, K+1).
            labels: B gold dicts (ARCHITECTURE.md, Model inputs).
            word_mask: (B, n); region_mask: (B, K); query_types: (u,) (needed by the existence head).

        Returns:
            B pairs ``(query_indices, gold_indices)`` of CPU long tensors, sorted by query index.
            With ``gold_repeat`` a gold index may appear several times (one per tiled copy).
        """
        mode = head_mode_of(layer)
        targets = prepare_targets(
            labels, word_mask, region_mask, query_types, self.num_queries, self.num_types, mode,
            gold_repeat=self.gold_repeat, device=layer["start_logits"].device,
        )
        matched = self.match_targets(layer, targets, query_types)
        return [(rows, targets.tiled[b][cols]) for b, (rows, cols) in enumerate(matched)]


def _fixed_target_assignment(
    targets: MatchTargets, query_types: Optional[torch.Tensor], num_queries: int
) -> MatchIndices:
    """Targets (already sorted by start) each take the next free query of their type (any type when
    ``query_types`` is None), in query index order. Capacity was checked by ``prepare_targets``."""
    types_of_query = None if query_types is None else query_types.detach().cpu().tolist()
    indices = []
    for b, count in enumerate(targets.num_targets):
        taken = [False] * num_queries
        rows, cols = [], []
        for col in range(count):
            wanted = int(targets.types_cpu[b, col])
            query = next(
                q for q in range(num_queries)
                if not taken[q] and (types_of_query is None or types_of_query[q] == wanted)
            )
            taken[query] = True
            rows.append(query)
            cols.append(col)
        order = sorted(range(count), key=lambda k: rows[k])
        indices.append((torch.tensor([rows[k] for k in order], dtype=torch.long),
                        torch.tensor([cols[k] for k in order], dtype=torch.long)))
    return indices


def fixed_assignment(
    labels: Sequence[Mapping[str, torch.Tensor]],
    query_types: Optional[torch.Tensor],
    num_queries: int,
    word_mask: torch.Tensor,
    region_mask: torch.Tensor,
    num_types: int,
    head_mode: str = "existence",
    gold_repeat: int = 0,
) -> MatchIndices:
    """The "w/o BML" ablation (paper Table 3; docs/DESIGN.md §5): no Hungarian matching. Each tweet's gold
    entities, sorted by (start, end), take in turn the next free query of their type in index order
    (softmax head: the next free query). ``query_types`` may be None for the softmax head.

    Returns B pairs ``(query_indices, gold_indices)`` like ``HungarianMatcher``.
    """
    if query_types is not None and query_types.numel() != num_queries:
        raise ValueError(f"query_types has {query_types.numel()} entries but num_queries={num_queries}.")
    targets = prepare_targets(
        labels, word_mask, region_mask, query_types, num_queries, num_types, head_mode,
        gold_repeat=gold_repeat, sort_by_start=True, device=torch.device("cpu"),
    )
    matched = _fixed_target_assignment(targets, query_types if head_mode == "existence" else None, num_queries)
    return [(rows, targets.tiled[b][cols]) for b, (rows, cols) in enumerate(matched)]


def boundary_targets(gold_words: torch.Tensor, words: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """(P, n) start or end targets: one-hot at ``gold_words`` (P,), or with ``smoothing`` ε > 0 boundary smoothing
    (Zhu and Li, ACL 2022): 1 − ε at the gold word and ε shared equally by its valid neighbours (``words`` (P, n)
    bool), one word to each side; a gold word with no valid neighbour keeps 1 (docs/DEVIATIONS.md)."""
    one_hot = F.one_hot(gold_words, words.shape[-1]).to(torch.float32)  # (P, n)
    if not smoothing:
        return one_hot
    neighbours = torch.zeros_like(one_hot)
    neighbours[:, :-1] += one_hot[:, 1:]  # the word before the gold one
    neighbours[:, 1:] += one_hot[:, :-1]  # the word after it
    neighbours = neighbours * words
    count = neighbours.sum(-1, keepdim=True)  # (P, 1): 0, 1 or 2
    share = torch.where(count > 0, smoothing / count.clamp(min=1.0), 0.0)
    keep = torch.where(count > 0, 1.0 - smoothing, 1.0)
    return one_hot * keep + neighbours * share


def num_targets_across_processes(count: int, device: torch.device) -> float:
    """The loss normaliser: gold targets per process, averaged over processes, at least 1.

    The paper normalises nothing; docs/DESIGN.md §5 normalises by the number of gold entities in the
    batch over all processes. As in DETR, the count is summed over processes with ``all_reduce``
    and divided by the world size: DistributedDataParallel averages gradients over processes, so
    each process dividing its summed loss by (total / world size) yields the gradient of
    (summed loss of the global batch) / (total targets of the global batch).
    """
    total = torch.tensor([float(count)], device=device)
    world_size = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
        world_size = torch.distributed.get_world_size()
    return max(total.item() / world_size, 1.0)


def loss_normaliser(count: int, device: torch.device):
    """``num_targets_across_processes`` without waiting for the device: a Python float on one process
    (the count is known on the host), a 0-d tensor (the all-reduced mean, at least 1) across processes,
    so that the collective's result is never read back to the host in ``forward``."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return max(float(count), 1.0)
    total = torch.tensor(float(count), device=device)
    torch.distributed.all_reduce(total)
    return (total / torch.distributed.get_world_size()).clamp_min(1.0)


class MQSPNLoss(nn.Module):
    """The bipartite matching loss (paper: L(Y, Ŷ); docs/DESIGN.md §5), summed over QFNet layers.

    Per layer: match (Hungarian, or the fixed w/o-BML assignment when
    ``config.use_bipartite_matching`` is False), then

    * class: existence BCE-with-logits on every query (target 1 if matched, ∅ targets weighted by
      ``null_class_weight``), or the (p+1)-way cross-entropy (∅ = class 0, weight
      ``null_class_weight``), summed over all B·u queries and divided by their summed weight (the
      weighted mean, ``null_weight_normalization="weighted_mean"``) or by the number of targets
      (``"entities"``);
    * start / end: BCE-with-logits of the start / end logits against the one-hot gold start / end
      over the tweet's valid words, summed over words and matched queries;
    * region: BCE-with-logits of the region logits against the multi-hot R_j over valid regions
      (column 0 always valid), summed over regions and matched queries; a groundable entity no
      proposal covers (labels' ``uncovered``) is left out with ``uncovered_region_target="ignore"``;

    each divided by the number of targets (``num_targets_across_processes``), and combined as
    ``loss_weight_class·class + loss_weight_span·(start + end) + loss_weight_region·region``.
    The class term covers every query and the span and region terms are sums over the (possibly
    empty) matched set, so every logit tensor of every layer stays in the autograd graph even on a
    batch without entities (docs/DESIGN.md §5: DDP needs no ``find_unused_parameters``).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_types = len(config.entity_types)
        self.num_queries = config.num_queries
        self.matcher = HungarianMatcher(config)

    def _match(self, layer, targets: MatchTargets, query_types) -> MatchIndices:
        if self.config.use_bipartite_matching:
            return self.matcher.match_targets(layer, targets, query_types)
        return _fixed_target_assignment(
            targets, query_types if head_mode_of(layer) == "existence" else None, self.num_queries
        )

    def match_all(self, layers, targets: MatchTargets, query_types) -> List[MatchIndices]:
        """The assignment of every layer, the Hungarian costs of all layers in one device-to-host transfer."""
        if self.config.use_bipartite_matching:
            return self.matcher.match_layers(layers, targets, query_types)
        return [self._match(layer, targets, query_types) for layer in layers]

    def layer_loss(
        self,
        layer: Mapping[str, torch.Tensor],
        targets: MatchTargets,
        word_mask: torch.Tensor,
        region_mask: torch.Tensor,
        query_types: Optional[torch.Tensor],
        normaliser: float,
        matched: Optional[MatchIndices] = None,
        class_normaliser: Optional[float] = None,
    ) -> Dict[str, torch.Tensor]:
        """Unweighted ``loss_class``, ``loss_start``, ``loss_end``, ``loss_region`` of one layer (``matched``:
        its assignment when already computed, see ``match_all``). The class term is divided by
        ``class_normaliser`` (default ``normaliser``), the others by ``normaliser``."""
        start_logits = layer["start_logits"]  # (B, u, n)
        region_logits = layer["region_logits"]  # (B, u, K+1)
        device = start_logits.device
        batch, queries, _ = start_logits.shape
        if matched is None:
            matched = self._match(layer, targets, query_types)
        batch_index = torch.cat([torch.full_like(rows, b) for b, (rows, _) in enumerate(matched)])
        index = torch.stack(
            [batch_index, torch.cat([rows for rows, _ in matched]), torch.cat([cols for _, cols in matched])]
        ).to(device, non_blocking=True)  # (3, P): tweet, query, target column of each matched pair
        batch_index, query_index, target_index = index[0], index[1], index[2]

        null_weight = self.config.null_class_weight
        if head_mode_of(layer) == "existence":
            logits = layer["existence_logits"].float()  # (B, u)
            existence = torch.zeros_like(logits)
            existence[batch_index, query_index] = 1.0
            weight = torch.where(existence > 0, 1.0, null_weight)
            loss_class = (F.binary_cross_entropy_with_logits(logits, existence, reduction="none") * weight).sum()
        else:
            logits = layer["class_logits"].float()  # (B, u, p+1)
            classes = torch.zeros(batch, queries, dtype=torch.long, device=device)
            classes[batch_index, query_index] = targets.type[batch_index, target_index] + 1
            class_weight = torch.ones(logits.shape[-1], device=device)
            class_weight[0] = null_weight
            loss_class = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), classes.reshape(-1), weight=class_weight, reduction="none"
            ).sum()

        words = word_mask.bool()[batch_index]  # (P, n)
        losses = {"loss_class": loss_class / (normaliser if class_normaliser is None else class_normaliser)}
        pointer = boundary_activation_of(self.config) == "softmax"
        smoothing = getattr(self.config, "boundary_smoothing", 0.0)
        for name, key, gold in (
            ("loss_start", "start_logits", targets.start),
            ("loss_end", "end_logits", targets.end),
        ):
            logits = layer[key].float()[batch_index, query_index]  # (P, n)
            gold_words = gold[batch_index, target_index]  # (P,)
            target = boundary_targets(gold_words, words, smoothing)  # (P, n)
            if pointer:
                # one distribution over the words (padding words carry a large negative logit): −Σ target · log P^s
                losses[name] = F.cross_entropy(masked_fill_logits(logits, words), target, reduction="sum") / normaliser
                continue
            element = F.binary_cross_entropy_with_logits(logits.masked_fill(~words, 0.0), target, reduction="none")
            losses[name] = (element * words).sum() / normaliser

        valid_regions = torch.cat(
            [torch.ones(batch, 1, dtype=torch.bool, device=device), region_mask.bool().to(device)], dim=1
        )[batch_index]  # (P, K+1)
        logits = region_logits.float()[batch_index, query_index]  # (P, K+1)
        gold_regions = targets.regions[batch_index, target_index].float()  # (P, K+1)
        element = F.binary_cross_entropy_with_logits(
            logits.masked_fill(~valid_regions, 0.0), gold_regions, reduction="none"
        )
        counted = valid_regions
        if getattr(self.config, "uncovered_region_target", "ignore") == "ignore" and targets.uncovered is not None:
            # a groundable entity no proposal covers: left out of the region loss (docs/DEVIATIONS.md)
            counted = counted & ~targets.uncovered[batch_index, target_index][:, None]
        losses["loss_region"] = (element * counted).sum() / normaliser
        return losses

    def class_normaliser(self, targets: MatchTargets, batch_size: int, normaliser: float, device) -> float:
        """The divisor of the class / existence term. ``null_weight_normalization="weighted_mean"`` (DETR): the
        summed weight of all B·u queries, every target matched with weight 1 and the other queries with
        ``null_class_weight``, over all processes, so the term is a weighted mean and the ∅ weight means the
        same in every batch whatever its entity count. ``"entities"``: ``normaliser``, the gold count."""
        if getattr(self.config, "null_weight_normalization", "weighted_mean") == "entities":
            return normaliser
        matched = targets.total
        weight = matched + self.config.null_class_weight * (batch_size * self.num_queries - matched)
        return loss_normaliser(weight, device)

    def weighted_total(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        config = self.config
        return (
            config.loss_weight_class * parts["loss_class"]
            + config.loss_weight_span * (parts["loss_start"] + parts["loss_end"])
            + config.loss_weight_region * parts["loss_region"]
        )

    def forward(
        self,
        layers: Sequence[Mapping[str, torch.Tensor]],
        labels: Sequence[Mapping[str, torch.Tensor]],
        word_mask: torch.Tensor,
        region_mask: torch.Tensor,
        query_types: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Loss summed over ``layers`` (earlier QFNet layers first, the final layer last).

        Returns ``(loss, loss_dict)``: ``loss_dict`` holds the final layer's unweighted
        ``loss_class``, ``loss_start``, ``loss_end``, ``loss_region``, the weighted sum of the earlier
        layers as ``loss_aux`` (when there are any) and the total as ``loss``, all detached.
        """
        if not layers:
            raise ValueError("MQSPNLoss needs at least the final layer's outputs.")
        final = layers[-1]
        device = final["start_logits"].device
        targets = prepare_targets(
            labels, word_mask, region_mask, query_types, self.num_queries, self.num_types, head_mode_of(final),
            gold_repeat=self.config.gold_repeat,
            sort_by_start=not self.config.use_bipartite_matching,
            device=device,
        )
        normaliser = loss_normaliser(targets.total, device)
        class_normaliser = self.class_normaliser(targets, word_mask.shape[0], normaliser, device)
        word_mask = word_mask.to(device, non_blocking=True)
        region_mask = region_mask.to(device, non_blocking=True)
        matched = self.match_all(layers, targets, query_types)

        aux_losses = [
            self.weighted_total(
                self.layer_loss(layer, targets, word_mask, region_mask, query_types, normaliser, matches,
                                class_normaliser=class_normaliser)
            )
            for layer, matches in zip(layers[:-1], matched[:-1])
        ]
        parts = self.layer_loss(final, targets, word_mask, region_mask, query_types, normaliser, matched[-1],
                                class_normaliser=class_normaliser)
        loss = self.weighted_total(parts)
        loss_dict = {name: value.detach() for name, value in parts.items()}
        if aux_losses:
            loss_aux = torch.stack(aux_losses).sum()
            loss = loss + loss_aux
            loss_dict["loss_aux"] = loss_aux.detach()
        loss_dict["loss"] = loss.detach()
        return loss, loss_dict
