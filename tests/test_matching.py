"""Tests of the bipartite matching and the loss (modeling_mqspn/matching_mqspn.py; docs/DESIGN.md §5)."""

import itertools
import math
import types

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from modeling_mqspn.matching_mqspn import (
    FORBIDDEN_COST,
    HungarianMatcher,
    MQSPNLoss,
    _tile_gold,
    boundary_targets,
    fixed_assignment,
    num_targets_across_processes,
    prepare_targets,
)


def make_config(**overrides):
    fields = dict(
        entity_types=["PER", "LOC", "ORG", "OTHER"],
        num_queries=8,
        gold_repeat=0,
        match_cost_class=1.0,
        match_cost_start=1.0,
        match_cost_end=1.0,
        match_cost_region=1.0,
        loss_weight_class=1.0,
        loss_weight_span=1.0,
        loss_weight_region=1.0,
        null_class_weight=0.1,
        use_bipartite_matching=True,
        use_auxiliary_loss=True,
    )
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


def random_layer(generator, batch, queries, words, regions, num_types, mode, requires_grad=False):
    shapes = {
        "start_logits": (batch, queries, words),
        "end_logits": (batch, queries, words),
        "region_logits": (batch, queries, regions + 1),
    }
    if mode == "existence":
        shapes["existence_logits"] = (batch, queries)
    else:
        shapes["class_logits"] = (batch, queries, num_types + 1)
    return {
        name: (2 * torch.randn(*shape, generator=generator)).requires_grad_(requires_grad)
        for name, shape in shapes.items()
    }


def entity(start, end, etype, regions, num_regions):
    row = [False] * num_regions
    for r in regions:
        row[r] = True
    return start, end, etype, row


def make_labels(per_tweet, num_regions, ids=None):
    labels = []
    for b, entities in enumerate(per_tweet):
        label = {
            "start": torch.tensor([e[0] for e in entities], dtype=torch.long),
            "end": torch.tensor([e[1] for e in entities], dtype=torch.long),
            "type": torch.tensor([e[2] for e in entities], dtype=torch.long),
            "regions": torch.tensor([e[3] for e in entities], dtype=torch.bool).reshape(len(entities), num_regions),
        }
        if ids is not None:
            label["id"] = ids[b]
        labels.append(label)
    return labels


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def pair_cost(layer, config, b, q, label, j, query_types):
    """C_ij of docs/DESIGN.md §5 written out with Python floats; None for a forbidden pair."""
    layer = {name: tensor.detach() for name, tensor in layer.items()}
    s, e, t = int(label["start"][j]), int(label["end"][j]), int(label["type"][j])
    if "existence_logits" in layer:
        if int(query_types[q]) != t:
            return None
        p_class = sigmoid(float(layer["existence_logits"][b, q]))
    else:
        p_class = float(layer["class_logits"][b, q].softmax(-1)[t + 1])
    p_start = sigmoid(float(layer["start_logits"][b, q, s]))
    p_end = sigmoid(float(layer["end_logits"][b, q, e]))
    p_region = max(
        sigmoid(float(layer["region_logits"][b, q, r]))
        for r in range(label["regions"].shape[1])
        if label["regions"][j, r]
    )
    return -(
        config.match_cost_class * p_class
        + config.match_cost_start * p_start
        + config.match_cost_end * p_end
        + config.match_cost_region * p_region
    )


def bce(x, z):
    """Binary cross-entropy −[z log σ(x) + (1 − z) log(1 − σ(x))], in its overflow-free form."""
    return max(x, 0.0) - x * z + math.log1p(math.exp(-abs(x)))


def reference_parts(layer, config, pairs, labels, word_mask, region_mask):
    """The unweighted loss parts of one layer for given (tweet, query, gold) pairs, by loops."""
    layer = {name: tensor.detach() for name, tensor in layer.items()}
    batch, queries, words = layer["start_logits"].shape
    matched = {(b, q): j for b, q, j in pairs}
    normaliser = max(len(pairs), 1)
    loss_class = 0.0
    for b in range(batch):
        for q in range(queries):
            j = matched.get((b, q))
            if "existence_logits" in layer:
                x = float(layer["existence_logits"][b, q])
                loss_class += bce(x, 1.0) if j is not None else config.null_class_weight * bce(x, 0.0)
            else:
                target = 0 if j is None else int(labels[b]["type"][j]) + 1
                log_prob = float(layer["class_logits"][b, q].log_softmax(-1)[target])
                loss_class += -log_prob * (config.null_class_weight if target == 0 else 1.0)
    if getattr(config, "null_weight_normalization", "weighted_mean") == "entities":
        class_normaliser = normaliser
    else:  # the weighted mean over all B·u queries (weight 1 matched, null_class_weight for ∅)
        class_normaliser = len(pairs) + config.null_class_weight * (batch * queries - len(pairs))
    parts = {"loss_class": loss_class / class_normaliser, "loss_start": 0.0, "loss_end": 0.0, "loss_region": 0.0}
    for b, q, j in pairs:
        for key, name, gold in (("start_logits", "loss_start", "start"), ("end_logits", "loss_end", "end")):
            for w in range(words):
                if word_mask[b, w]:
                    z = 1.0 if w == int(labels[b][gold][j]) else 0.0
                    parts[name] += bce(float(layer[key][b, q, w]), z) / normaliser
        for r in range(layer["region_logits"].shape[2]):
            if r == 0 or region_mask[b, r - 1]:
                z = float(labels[b]["regions"][j, r])
                parts["loss_region"] += bce(float(layer["region_logits"][b, q, r]), z) / normaliser
    return parts


def flat_pairs(indices):
    return [(b, int(q), int(j)) for b, (rows, cols) in enumerate(indices) for q, j in zip(rows, cols)]


@st.composite
def matching_problem(draw):
    mode = draw(st.sampled_from(["existence", "softmax"]))
    queries = draw(st.integers(1, 6))
    num_types = draw(st.integers(1, 3))
    words = draw(st.integers(1, 4))
    regions = draw(st.integers(0, 3))
    entities = []
    for _ in range(draw(st.integers(0, 4))):
        start = draw(st.integers(0, words - 1))
        end = draw(st.integers(start, words - 1))
        covered = draw(st.lists(st.integers(1, regions), max_size=regions, unique=True)) if regions else []
        entities.append(entity(start, end, draw(st.integers(0, num_types - 1)), covered or [0], regions + 1))
    seed = draw(st.integers(0, 2**31 - 1))
    weights = draw(st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=4, max_size=4))
    return mode, queries, num_types, words, regions, entities, seed, weights


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(matching_problem())
def test_hungarian_matcher_equals_brute_force(problem):
    """The matcher's assignment has the minimum total cost over every injective query assignment
    (type-respecting in existence mode), for random logits, weights and gold sets."""
    mode, queries, num_types, words, regions, entities, seed, weights = problem
    query_types = torch.arange(queries) % num_types
    if mode == "existence":
        for t in range(num_types):
            assume(sum(e[2] == t for e in entities) <= int((query_types == t).sum()))
    else:
        assume(len(entities) <= queries)
    config = make_config(
        entity_types=[f"T{t}" for t in range(num_types)], num_queries=queries,
        match_cost_class=weights[0], match_cost_start=weights[1], match_cost_end=weights[2],
        match_cost_region=weights[3],
    )
    generator = torch.Generator().manual_seed(seed)
    layer = random_layer(generator, 1, queries, words, regions, num_types, mode)
    labels = make_labels([entities], regions + 1)
    word_mask = torch.ones(1, words, dtype=torch.bool)
    region_mask = torch.ones(1, regions, dtype=torch.bool)

    rows, cols = HungarianMatcher(config)(layer, labels, word_mask, region_mask, query_types)[0]
    assert sorted(cols.tolist()) == list(range(len(entities)))
    assert len(set(rows.tolist())) == len(entities)
    got = [pair_cost(layer, config, 0, int(q), labels[0], int(j), query_types) for q, j in zip(rows, cols)]
    assert None not in got

    best = math.inf
    for chosen in itertools.permutations(range(queries), len(entities)):
        costs = [pair_cost(layer, config, 0, q, labels[0], j, query_types) for j, q in enumerate(chosen)]
        if None not in costs:
            best = min(best, sum(costs))
    assert sum(got) == pytest.approx(best, abs=1e-4)


def test_existence_mode_never_matches_across_types():
    """Queries of the wrong type made far more attractive are still never matched (forbidden pairs)."""
    torch.manual_seed(0)
    queries, num_types, words, regions = 12, 4, 6, 3
    query_types = torch.arange(queries) % num_types
    config = make_config(num_queries=queries)
    layer = random_layer(torch.Generator().manual_seed(1), 3, queries, words, regions, num_types, "existence")
    # Type-0 queries predict every gold span and region perfectly; the gold entities are of types 1..3.
    for q in range(0, queries, num_types):
        layer["existence_logits"][:, q] = 20.0
        layer["start_logits"][:, q] = 20.0
        layer["end_logits"][:, q] = 20.0
        layer["region_logits"][:, q] = 20.0
    per_tweet = [
        [entity(0, 1, 1, [1], 4), entity(2, 2, 2, [0], 4), entity(3, 5, 3, [2, 3], 4)],
        [entity(0, 0, 1, [0], 4), entity(1, 1, 1, [1], 4), entity(4, 5, 1, [3], 4)],
        [entity(5, 5, 2, [2], 4)],
    ]
    labels = make_labels(per_tweet, regions + 1)
    word_mask = torch.ones(3, words, dtype=torch.bool)
    region_mask = torch.ones(3, regions, dtype=torch.bool)
    indices = HungarianMatcher(config)(layer, labels, word_mask, region_mask, query_types)
    for b, (rows, cols) in enumerate(indices):
        assert len(rows) == len(per_tweet[b])
        for q, j in zip(rows.tolist(), cols.tolist()):
            assert int(query_types[q]) == per_tweet[b][j][2]
    assert FORBIDDEN_COST > 100 * (config.match_cost_class + config.match_cost_start + config.match_cost_end
                                   + config.match_cost_region)


def test_too_many_entities_of_a_type_names_the_sample():
    config = make_config(num_queries=8)  # 2 queries per type
    query_types = torch.arange(8) % 4
    layer = random_layer(torch.Generator().manual_seed(0), 2, 8, 4, 1, 4, "existence")
    per_tweet = [[entity(0, 0, 1, [0], 2)], [entity(0, 0, 0, [0], 2), entity(1, 1, 0, [1], 2), entity(2, 3, 0, [0], 2)]]
    word_mask = torch.ones(2, 4, dtype=torch.bool)
    region_mask = torch.ones(2, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"'tweet-42'.*3 gold entities of type 0.*raise num_queries"):
        HungarianMatcher(config)(layer, make_labels(per_tweet, 2, ids=["tweet-7", "tweet-42"]), word_mask,
                                 region_mask, query_types)
    with pytest.raises(ValueError, match=r"batch index 1.*raise num_queries"):
        MQSPNLoss(config)([layer], make_labels(per_tweet, 2), word_mask, region_mask, query_types)


def test_too_many_entities_softmax_mode():
    config = make_config(num_queries=2)
    layer = random_layer(torch.Generator().manual_seed(0), 1, 2, 4, 0, 4, "softmax")
    labels = make_labels([[entity(w, w, 0, [0], 1) for w in range(3)]], 1, ids=["t1"])
    with pytest.raises(ValueError, match=r"'t1'.*3 gold entities.*num_queries=2.*raise num_queries"):
        HungarianMatcher(config)(layer, labels, torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 0, dtype=torch.bool),
                                 torch.arange(2) % 4)


@pytest.mark.parametrize(
    "labels_entity, message",
    [
        (entity(2, 3, 0, [0], 2), r"'bad'.*entity 0 has span \(2, 3\)"),  # word 3 is padding
        (entity(1, 0, 0, [0], 2), r"'bad'.*span \(1, 0\)"),
        (entity(0, 0, 5, [0], 2), r"'bad'.*type 5"),
        (entity(0, 0, 0, [], 2), r"'bad'.*no region set"),
        (entity(0, 0, 0, [1], 2), r"'bad'.*padding proposals \[1\]"),
    ],
)
def test_invalid_labels_name_the_sample(labels_entity, message):
    config = make_config()
    layer = random_layer(torch.Generator().manual_seed(0), 1, 8, 4, 1, 4, "existence")
    word_mask = torch.tensor([[1, 1, 1, 0]])
    region_mask = torch.tensor([[0]])
    with pytest.raises(ValueError, match=message):
        MQSPNLoss(config)([layer], make_labels([[labels_entity]], 2, ids=["bad"]), word_mask, region_mask,
                          torch.arange(8) % 4)


def test_tile_gold_cycles_within_capacity():
    # Existence mode: type 0 has 3 queries, type 1 has 1 query.
    assert _tile_gold([0, 1, 2], [0, 0, 1], {0: 3, 1: 1}, 4, gold_repeat=6) == [0, 1, 2, 0]
    # Softmax mode: capped by the number of queries.
    assert _tile_gold([0, 1, 2], [0, 0, 1], None, 5, gold_repeat=7) == [0, 1, 2, 0, 1]
    assert _tile_gold([2, 0, 1], [0, 0, 0], None, 60, gold_repeat=7) == [2, 0, 1, 2, 0, 1, 2]
    # Fewer repeats than entities never drops an entity; no entities stay none.
    assert _tile_gold([0, 1, 2], [0, 1, 2], None, 60, gold_repeat=2) == [0, 1, 2]
    assert _tile_gold([], [], None, 60, gold_repeat=45) == []


def test_gold_repeat_matches_every_copy_and_normalises_by_targets():
    queries, words = 8, 4
    query_types = torch.arange(queries) % 4  # 2 queries per type
    layer = random_layer(torch.Generator().manual_seed(3), 2, queries, words, 1, 4, "existence", requires_grad=True)
    per_tweet = [[entity(0, 1, 0, [1], 2), entity(3, 3, 2, [0], 2)], []]
    labels = make_labels(per_tweet, 2)
    word_mask = torch.ones(2, words, dtype=torch.bool)
    region_mask = torch.ones(2, 1, dtype=torch.bool)

    config = make_config(num_queries=queries, gold_repeat=5)
    indices = HungarianMatcher(config)(layer, labels, word_mask, region_mask, query_types)
    rows, cols = indices[0]
    assert sorted(cols.tolist()) == [0, 0, 1, 1]  # per-type capacity 2 stops the tiling at 4 targets
    assert all(int(query_types[q]) == per_tweet[0][j][2] for q, j in zip(rows.tolist(), cols.tolist()))
    assert indices[1][0].numel() == 0

    loss, parts = MQSPNLoss(config)([layer], labels, word_mask, region_mask, query_types)
    expected = reference_parts(layer, config, flat_pairs(indices), labels, word_mask, region_mask)
    for name, value in expected.items():
        assert parts[name].item() == pytest.approx(value, rel=1e-5)  # normaliser = 4 targets

    softmax_layer = random_layer(torch.Generator().manual_seed(4), 1, queries, words, 1, 4, "softmax")
    rows, cols = HungarianMatcher(make_config(num_queries=queries, gold_repeat=45))(
        softmax_layer, labels[:1], word_mask[:1], region_mask[:1], query_types
    )[0]
    assert sorted(cols.tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]  # capped by the 8 queries


def test_fixed_assignment_order():
    """w/o BML: gold sorted by start, each to the next free query of its type in index order."""
    query_types = torch.arange(8) % 4  # type 0: queries 0, 4; type 1: queries 1, 5
    per_tweet = [[entity(5, 5, 1, [0], 1), entity(0, 1, 1, [0], 1), entity(3, 3, 0, [0], 1)], [entity(2, 2, 3, [0], 1)]]
    labels = make_labels(per_tweet, 1)
    word_mask = torch.ones(2, 6, dtype=torch.bool)
    region_mask = torch.ones(2, 0, dtype=torch.bool)
    indices = fixed_assignment(labels, query_types, 8, word_mask, region_mask, 4)
    assert [(q.tolist(), j.tolist()) for q, j in indices] == [([0, 1, 5], [2, 1, 0]), ([3], [0])]

    indices = fixed_assignment(labels, None, 8, word_mask, region_mask, 4, head_mode="softmax")
    assert [(q.tolist(), j.tolist()) for q, j in indices] == [([0, 1, 2], [1, 2, 0]), ([0], [0])]

    indices = fixed_assignment(labels[:1], query_types, 8, word_mask[:1], region_mask[:1], 4, gold_repeat=5)
    # Sorted order 1, 2, 0 tiled within the 2-per-type capacity: 1, 2, 0, 2 (a third type-1 copy has no query).
    assert [(q.tolist(), j.tolist()) for q, j in indices] == [([0, 1, 4, 5], [2, 1, 2, 0])]


@pytest.mark.parametrize("mode", ["existence", "softmax"])
def test_loss_without_bipartite_matching_uses_fixed_assignment(mode):
    queries, words, regions = 8, 5, 2
    query_types = torch.arange(queries) % 4
    layer = random_layer(torch.Generator().manual_seed(5), 1, queries, words, regions, 4, mode)
    per_tweet = [[entity(3, 4, 1, [2], 3), entity(0, 0, 1, [0], 3)]]
    labels = make_labels(per_tweet, regions + 1)
    word_mask = torch.ones(1, words, dtype=torch.bool)
    region_mask = torch.ones(1, regions, dtype=torch.bool)
    # Make the Hungarian choice differ from the fixed one: query 1 fits entity 0, query 5 entity 1.
    layer["start_logits"][0, 1, 3] = layer["end_logits"][0, 1, 4] = 30.0
    layer["start_logits"][0, 5, 0] = layer["end_logits"][0, 5, 0] = 30.0
    config = make_config(num_queries=queries, use_bipartite_matching=False)
    _, parts = MQSPNLoss(config)([layer], labels, word_mask, region_mask, query_types)
    fixed = fixed_assignment(labels, query_types, queries, word_mask, region_mask, 4, head_mode=mode)
    assert fixed[0][0].tolist() == ([1, 5] if mode == "existence" else [0, 1])
    expected = reference_parts(layer, config, flat_pairs(fixed), labels, word_mask, region_mask)
    for name, value in expected.items():
        assert parts[name].item() == pytest.approx(value, rel=1e-5)
    hungarian = HungarianMatcher(config)(layer, labels, word_mask, region_mask, query_types)
    assert flat_pairs(hungarian) != flat_pairs(fixed)


def test_loss_equals_hand_computed_value():
    """One tweet, two PER queries, one gold entity (word 0, proposal 1); word 1 and no proposal are
    padding. Query 0 is clearly the better match."""
    config = make_config(entity_types=["PER"], num_queries=2, null_class_weight=0.25, loss_weight_span=2.0,
                         loss_weight_region=0.5)
    layer = {
        "existence_logits": torch.tensor([[2.0, -1.0]]),
        "start_logits": torch.tensor([[[1.0, -1.0], [-3.0, -3.0]]]),
        "end_logits": torch.tensor([[[0.5, 9.0], [-3.0, -3.0]]]),
        "region_logits": torch.tensor([[[-2.0, 3.0], [-3.0, -3.0]]]),
    }
    labels = make_labels([[entity(0, 0, 0, [1], 2)]], 2)
    word_mask, region_mask, query_types = torch.tensor([[1, 0]]), torch.tensor([[1]]), torch.zeros(2, dtype=torch.long)
    loss, parts = MQSPNLoss(config)([layer], labels, word_mask, region_mask, query_types)

    softplus = lambda x: math.log1p(math.exp(x))  # BCE(x, 1) = softplus(−x), BCE(x, 0) = softplus(x)
    # the weighted mean over the two queries: weights 1 (matched) and 0.25 (∅)
    loss_class = (softplus(-2.0) + 0.25 * softplus(-1.0)) / (1.0 + 0.25)
    loss_start = softplus(-1.0)  # word 1 is padding: its logit −1 does not count
    loss_end = softplus(-0.5)  # nor does the padding end logit 9
    loss_region = softplus(-2.0) + softplus(-3.0)
    assert parts["loss_class"].item() == pytest.approx(loss_class, rel=1e-6)
    assert parts["loss_start"].item() == pytest.approx(loss_start, rel=1e-6)
    assert parts["loss_end"].item() == pytest.approx(loss_end, rel=1e-6)
    assert parts["loss_region"].item() == pytest.approx(loss_region, rel=1e-6)
    total = loss_class + 2.0 * (loss_start + loss_end) + 0.5 * loss_region
    assert loss.item() == pytest.approx(total, rel=1e-6)
    assert parts["loss"].item() == pytest.approx(total, rel=1e-6)
    assert "loss_aux" not in parts


def test_pointer_boundaries_are_a_cross_entropy_over_the_valid_words():
    """boundary_activation="softmax": the start / end terms are −log softmax at the gold word over the valid
    words (padding excluded), and the matching cost reads the same softmax probabilities."""
    config = make_config(entity_types=["PER"], num_queries=2, boundary_activation="softmax")
    layer = {
        "existence_logits": torch.tensor([[2.0, -1.0]]),
        "start_logits": torch.tensor([[[1.0, -1.0, 5.0], [-3.0, 0.0, -3.0]]]),
        "end_logits": torch.tensor([[[0.5, 2.0, 9.0], [-3.0, -3.0, -3.0]]]),
        "region_logits": torch.tensor([[[-2.0, 3.0], [-3.0, -3.0]]]),
    }
    labels = make_labels([[entity(0, 1, 0, [1], 2)]], 2)
    word_mask, region_mask, query_types = torch.tensor([[1, 1, 0]]), torch.tensor([[1]]), torch.zeros(2, dtype=torch.long)
    _, parts = MQSPNLoss(config)([layer], labels, word_mask, region_mask, query_types)
    log_softmax = lambda values, index: values[index] - math.log(sum(math.exp(v) for v in values))
    assert parts["loss_start"].item() == pytest.approx(-log_softmax([1.0, -1.0], 0), rel=1e-6)  # word 2 is padding
    assert parts["loss_end"].item() == pytest.approx(-log_softmax([0.5, 2.0], 1), rel=1e-6)
    # the sigmoid reading of the same logits gives a different (BCE) value
    _, bce = MQSPNLoss(make_config(entity_types=["PER"], num_queries=2))([layer], labels, word_mask, region_mask, query_types)
    assert bce["loss_start"].item() != pytest.approx(parts["loss_start"].item(), rel=1e-3)

    masked = {**layer, "start_logits": layer["start_logits"].masked_fill(~word_mask.bool()[:, None], -1e9),
              "end_logits": layer["end_logits"].masked_fill(~word_mask.bool()[:, None], -1e9)}
    targets = prepare_targets(labels, word_mask, region_mask, query_types, 2, 1, "existence", device=torch.device("cpu"))
    cost = HungarianMatcher(config).cost_matrix(masked, targets, query_types)  # (1, 2, 1)
    start = torch.softmax(torch.tensor([1.0, -1.0]), 0)[0]
    end = torch.softmax(torch.tensor([0.5, 2.0]), 0)[1]
    expected = -(torch.sigmoid(torch.tensor(2.0)) + start + end + torch.sigmoid(torch.tensor(3.0)))
    assert cost[0, 0, 0].item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("mode", ["existence", "softmax"])
@pytest.mark.parametrize("regions", [0, 3])
@pytest.mark.parametrize("with_entities", [True, False])
def test_loss_finite_with_gradient_to_every_input(mode, regions, with_entities):
    torch.manual_seed(0)
    queries, words = 8, 5
    query_types = torch.arange(queries) % 4
    generator = torch.Generator().manual_seed(11)
    layers = [random_layer(generator, 2, queries, words, regions, 4, mode, requires_grad=True) for _ in range(3)]
    per_tweet = [[entity(0, 2, 0, [regions] if regions else [0], regions + 1), entity(3, 3, 1, [0], regions + 1)],
                 [entity(1, 1, 3, [0], regions + 1)]] if with_entities else [[], []]
    labels = make_labels(per_tweet, regions + 1)
    word_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    region_mask = torch.ones(2, regions, dtype=torch.long)
    config = make_config(num_queries=queries)
    loss, parts = MQSPNLoss(config)(layers, labels, word_mask, region_mask, query_types)
    assert torch.isfinite(loss)
    loss.backward()
    for layer in layers:
        for name, tensor in layer.items():
            assert tensor.grad is not None, name
            assert torch.isfinite(tensor.grad).all(), name
    class_key = "existence_logits" if mode == "existence" else "class_logits"
    assert (layers[0][class_key].grad != 0).all()  # the class term covers every query of every layer
    if with_entities:
        for name in ("start_logits", "end_logits", "region_logits"):
            assert layers[-1][name].grad.abs().sum() > 0, name
        assert parts["loss_start"] > 0 and parts["loss_region"] > 0
    else:
        assert parts["loss_class"] > 0
        assert parts["loss_start"] == parts["loss_end"] == parts["loss_region"] == 0
    assert set(parts) == {"loss_class", "loss_start", "loss_end", "loss_region", "loss_aux", "loss"}
    last = MQSPNLoss(config).weighted_total(parts)
    assert parts["loss"].item() == pytest.approx((last + parts["loss_aux"]).item(), rel=1e-6)


@pytest.mark.parametrize("mode", ["existence", "softmax"])
def test_loss_matches_reference_and_normaliser(mode):
    """Parts equal the loop reference divided by the number of gold entities (3 here), the
    padding words and regions excluded; a batch without entities divides by 1."""
    queries, words, regions = 8, 5, 2
    query_types = torch.arange(queries) % 4
    layer = random_layer(torch.Generator().manual_seed(7), 2, queries, words, regions, 4, mode)
    word_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    region_mask = torch.tensor([[1, 1], [1, 0]])
    config = make_config(num_queries=queries, null_class_weight=0.3)
    for per_tweet in ([[entity(0, 2, 0, [1, 2], 3), entity(4, 4, 2, [0], 3)], [entity(1, 2, 3, [1], 3)]], [[], []]):
        labels = make_labels(per_tweet, regions + 1)
        _, parts = MQSPNLoss(config)([layer], labels, word_mask, region_mask, query_types)
        indices = HungarianMatcher(config)(layer, labels, word_mask, region_mask, query_types)
        assert len(flat_pairs(indices)) == sum(len(e) for e in per_tweet)
        expected = reference_parts(layer, config, flat_pairs(indices), labels, word_mask, region_mask)
        for name, value in expected.items():
            assert parts[name].item() == pytest.approx(value, rel=1e-5, abs=1e-7), name


def test_normaliser_single_process():
    assert num_targets_across_processes(5, torch.device("cpu")) == 5.0
    assert num_targets_across_processes(0, torch.device("cpu")) == 1.0


def test_normaliser_averages_over_processes(monkeypatch):
    """Under torch.distributed the count is summed by all_reduce and divided by the world size, as in
    DETR: this process has 1 target, the simulated other process 4, so each divides by 2.5."""
    def all_reduce(tensor):
        tensor += 4.0

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    assert num_targets_across_processes(1, torch.device("cpu")) == 2.5
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor: None)
    assert num_targets_across_processes(0, torch.device("cpu")) == 1.0  # clamped at 1


def test_mqspn_config_provides_every_field_the_loss_reads():
    """MQSPNConfig's defaults give the same loss as the namespace with the ARCHITECTURE.md defaults."""
    from modeling_mqspn.configuration_mqspn import MQSPNConfig

    queries, words, regions = 8, 5, 2
    query_types = torch.arange(queries) % 4
    layers = [
        random_layer(torch.Generator().manual_seed(seed), 1, queries, words, regions, 4, "existence") for seed in (1, 2)
    ]
    labels = make_labels([[entity(0, 1, 2, [1], 3)]], regions + 1)
    word_mask, region_mask = torch.ones(1, words), torch.ones(1, regions)
    loss, _ = MQSPNLoss(MQSPNConfig(num_queries=queries))(layers, labels, word_mask, region_mask, query_types)
    expected, _ = MQSPNLoss(make_config(num_queries=queries))(layers, labels, word_mask, region_mask, query_types)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_boundary_targets_share_epsilon_with_the_valid_neighbours():
    """boundary_smoothing ε: 1 − ε at the gold word, ε split over the valid words beside it (one per side);
    padding words get nothing, and a one-word tweet keeps its one-hot target."""
    words = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    gold = torch.tensor([0, 1, 2, 0])
    expected = torch.tensor(
        [[0.8, 0.2, 0.0, 0.0], [0.1, 0.8, 0.1, 0.0], [0.0, 0.2, 0.8, 0.0], [1.0, 0.0, 0.0, 0.0]]
    )
    assert torch.allclose(boundary_targets(gold, words, 0.2), expected)
    assert torch.equal(boundary_targets(gold, words, 0.0), torch.eye(4)[gold])
    assert torch.allclose(boundary_targets(gold, words, 0.2).sum(-1), torch.ones(4))


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_boundary_smoothing_changes_only_the_boundary_terms(activation):
    """With ε = 0.2 the start / end terms are the cross-entropies against the smoothed targets (worked by hand);
    the class and region terms and the matching are those of ε = 0."""
    layer = {
        "existence_logits": torch.tensor([[2.0, -1.0]]),
        "start_logits": torch.tensor([[[1.0, -1.0, 0.5, 4.0], [-3.0, 0.0, -3.0, 0.0]]]),
        "end_logits": torch.tensor([[[0.5, 2.0, -1.0, 7.0], [-3.0, -3.0, -3.0, 0.0]]]),
        "region_logits": torch.tensor([[[-2.0, 3.0], [-3.0, -3.0]]]),
    }
    labels = make_labels([[entity(1, 2, 0, [1], 2)]], 2)  # start word 1 (two neighbours), end word 2 (one: 3 is padding)
    word_mask, region_mask, query_types = torch.tensor([[1, 1, 1, 0]]), torch.tensor([[1]]), torch.zeros(2, dtype=torch.long)
    config = make_config(entity_types=["PER"], num_queries=2, boundary_activation=activation, boundary_smoothing=0.2)
    plain = make_config(entity_types=["PER"], num_queries=2, boundary_activation=activation, boundary_smoothing=0.0)
    _, parts = MQSPNLoss(config)([layer], labels, word_mask, region_mask, query_types)
    _, reference = MQSPNLoss(plain)([layer], labels, word_mask, region_mask, query_types)

    start_target, end_target = [0.1, 0.8, 0.1], [0.0, 0.2, 0.8]
    start_logits, end_logits = [1.0, -1.0, 0.5], [0.5, 2.0, -1.0]  # query 0 (the match), the three real words
    if activation == "sigmoid":
        bce = lambda x, y: math.log1p(math.exp(-abs(x))) + max(x, 0.0) - x * y
        expected_start = sum(bce(x, y) for x, y in zip(start_logits, start_target))
        expected_end = sum(bce(x, y) for x, y in zip(end_logits, end_target))
    else:
        log_softmax = lambda values, i: values[i] - math.log(sum(math.exp(v) for v in values))
        expected_start = -sum(y * log_softmax(start_logits, i) for i, y in enumerate(start_target))
        expected_end = -sum(y * log_softmax(end_logits, i) for i, y in enumerate(end_target))
    assert parts["loss_start"].item() == pytest.approx(expected_start, rel=1e-6)
    assert parts["loss_end"].item() == pytest.approx(expected_end, rel=1e-6)
    assert parts["loss_start"].item() != pytest.approx(reference["loss_start"].item(), rel=1e-3)
    for name in ("loss_class", "loss_region"):
        assert parts[name].item() == pytest.approx(reference[name].item(), rel=1e-6)
