"""Tests of decode_predictions (modeling_mqspn/decoding_mqspn.py; docs/DESIGN.md §7)."""

import math
import types
from dataclasses import dataclass
from typing import List, Optional

import pytest
import torch
from transformers.utils import ModelOutput

from modeling_mqspn.decoding_mqspn import decode_predictions

ENTITY_TYPES = ["PER", "LOC", "ORG", "OTHER"]
LOW = -10.0  # a logit whose probability is negligible


def make_config(**overrides):
    fields = dict(entity_types=ENTITY_TYPES, existence_threshold=0.5, max_span_words=10)
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


def blank_outputs(batch=1, queries=8, words=6, regions=2, mode="existence"):
    outputs = {
        "start_logits": torch.full((batch, queries, words), LOW),
        "end_logits": torch.full((batch, queries, words), LOW),
        "region_logits": torch.full((batch, queries, regions + 1), LOW),
        "query_types": torch.arange(queries) % len(ENTITY_TYPES),
    }
    if mode == "existence":
        outputs["existence_logits"] = torch.full((batch, queries), LOW)
    else:
        outputs["class_logits"] = torch.full((batch, queries, len(ENTITY_TYPES) + 1), LOW)
        outputs["class_logits"][:, :, 0] = 5.0  # every query predicts ∅ unless set otherwise
    return outputs


def set_query(outputs, b, q, start, end, region, existence=5.0, boundary=5.0, region_logit=5.0):
    outputs["existence_logits"][b, q] = existence
    outputs["start_logits"][b, q, start] = boundary
    outputs["end_logits"][b, q, end] = boundary
    outputs["region_logits"][b, q, region] = region_logit


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def masks(batch=1, words=6, regions=2):
    return torch.ones(batch, words, dtype=torch.bool), torch.ones(batch, regions, dtype=torch.bool)


def test_threshold_keeps_queries_at_or_above_it():
    outputs = blank_outputs()
    set_query(outputs, 0, 0, 0, 1, 0, existence=math.log(0.6 / 0.4))  # P^c = 0.6, type PER
    set_query(outputs, 0, 1, 3, 3, 2, existence=math.log(0.4 / 0.6))  # P^c = 0.4, type LOC
    word_mask, region_mask = masks()
    default = decode_predictions(outputs, make_config(), word_mask, region_mask)
    assert [(p["start"], p["end"], p["type"]) for p in default[0]] == [(0, 1, "PER")]
    assert default[0][0]["score"] == pytest.approx(0.6 * sigmoid(5.0), rel=1e-5)
    lower = decode_predictions(outputs, make_config(), word_mask, region_mask, threshold=0.3)
    assert [(p["start"], p["end"], p["type"], p["region"]) for p in lower[0]] == [(0, 1, "PER", 0), (3, 3, "LOC", 2)]
    from_config = decode_predictions(outputs, make_config(existence_threshold=0.7), word_mask, region_mask)
    assert from_config == [[]]


def test_span_length_limit_and_start_not_after_end():
    outputs = blank_outputs(queries=4, words=8)
    # Query 0: the best pair (0, 6) is 7 words long; within 3 words the best is (4, 6).
    set_query(outputs, 0, 0, 0, 6, 0, boundary=6.0)
    outputs["start_logits"][0, 0, 4] = 2.0
    # Query 1: the start peak (5) lies after the end peak (2); s ≤ e forces another pair.
    set_query(outputs, 0, 1, 5, 2, 0, boundary=6.0)
    outputs["start_logits"][0, 1, 1] = 1.0
    word_mask, region_mask = masks(words=8)
    config = make_config(max_span_words=3)
    spans = {(p["start"], p["end"]) for p in decode_predictions(outputs, config, word_mask, region_mask)[0]}
    assert spans == {(4, 6), (1, 2)}
    unlimited = decode_predictions(outputs, make_config(max_span_words=10), word_mask, region_mask)[0]
    assert [(p["start"], p["end"]) for p in unlimited] == [(0, 6)]  # (1, 2) overlaps the wider span


def test_random_outputs_equal_brute_force():
    """On random logits every decoded span is the brute-force best allowed (s, e), the region the
    best valid region, and the scores follow the documented formula."""
    torch.manual_seed(0)
    batch, queries, words, regions = 3, 8, 7, 3
    outputs = {
        "existence_logits": torch.randn(batch, queries) + 1.0,
        "start_logits": torch.randn(batch, queries, words) * 2,
        "end_logits": torch.randn(batch, queries, words) * 2,
        "region_logits": torch.randn(batch, queries, regions + 1) * 2,
        "query_types": torch.arange(queries) % 4,
    }
    word_mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4], dtype=torch.bool)
    region_mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    config = make_config(max_span_words=3, existence_threshold=0.0)
    predictions = decode_predictions(outputs, config, word_mask, region_mask)
    seen = 0
    for b, tweet in enumerate(predictions):
        n_words, n_regions = int(word_mask[b].sum()), int(region_mask[b].sum())
        for prediction in tweet:
            p_start = outputs["start_logits"][b].sigmoid()
            p_end = outputs["end_logits"][b].sigmoid()
            candidates = [
                (float(p_start[q, s] * p_end[q, e]), q, s, e)
                for q in range(queries)
                for s in range(n_words)
                for e in range(s, min(s + config.max_span_words, n_words))
            ]
            # The query behind this prediction: the one whose best span and score match it.
            matches = []
            for q in range(queries):
                best = max(c for c in candidates if c[1] == q)
                existence = float(outputs["existence_logits"][b, q].sigmoid())
                if (best[2], best[3]) == (prediction["start"], prediction["end"]) and math.isclose(
                    existence * math.sqrt(best[0]), prediction["score"], rel_tol=1e-5
                ):
                    matches.append(q)
            assert len(matches) == 1
            q = matches[0]
            region_prob = outputs["region_logits"][b, q, : n_regions + 1].sigmoid()
            assert prediction["region"] == int(region_prob.argmax())
            assert prediction["region_score"] == pytest.approx(float(region_prob.max()), rel=1e-5)
            assert prediction["type_id"] == q % 4 and prediction["type"] == ENTITY_TYPES[q % 4]
            seen += 1
    assert seen >= 3


def test_overlap_filter_keeps_the_higher_score():
    outputs = blank_outputs()
    set_query(outputs, 0, 0, 1, 3, 0, existence=1.0)  # lower score
    set_query(outputs, 0, 1, 0, 1, 1, existence=4.0)  # higher score, overlaps (1, 3)
    set_query(outputs, 0, 2, 0, 1, 2, existence=3.0)  # identical span, lower score
    set_query(outputs, 0, 3, 4, 5, 0, existence=0.5)  # disjoint, kept
    word_mask, region_mask = masks()
    predictions = decode_predictions(outputs, make_config(), word_mask, region_mask)[0]
    assert [(p["start"], p["end"], p["type"], p["region"]) for p in predictions] == [
        (0, 1, "LOC", 1),
        (4, 5, "OTHER", 0),
    ]
    assert predictions[0]["score"] == pytest.approx(sigmoid(4.0) * sigmoid(5.0), rel=1e-5)


def test_region_zero_means_no_region():
    outputs = blank_outputs()
    set_query(outputs, 0, 0, 2, 2, 0, region_logit=1.5)
    word_mask, region_mask = masks()
    (prediction,) = decode_predictions(outputs, make_config(), word_mask, region_mask)[0]
    assert prediction["region"] == 0
    assert prediction["region_score"] == pytest.approx(sigmoid(1.5), rel=1e-6)


def test_padding_words_and_regions_are_never_chosen():
    """Padding positions given the highest logits of all still lose to the valid ones."""
    outputs = blank_outputs(batch=2, words=6, regions=3)
    word_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    region_mask = torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    for b in range(2):
        set_query(outputs, b, 0, 1, 1, 1, existence=5.0, boundary=0.0, region_logit=0.0)
        outputs["start_logits"][b, 0, 4:] = 9.0
        outputs["end_logits"][b, 0, 4:] = 9.0
        outputs["region_logits"][b, 0, 2:] = 9.0
    predictions = decode_predictions(outputs, make_config(), word_mask, region_mask)
    assert [(p["start"], p["end"], p["region"]) for p in predictions[0]] == [(1, 1, 1)]
    assert [(p["start"], p["end"], p["region"]) for p in predictions[1]] == [(1, 1, 0)]


def test_softmax_head():
    outputs = blank_outputs(mode="softmax")
    outputs["class_logits"][0, 0] = torch.tensor([0.0, 0.0, 0.0, 3.0, 0.0])  # ORG
    outputs["class_logits"][0, 5] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])  # PER, probability < 0.5
    outputs["start_logits"][0, 0, 0] = outputs["end_logits"][0, 0, 1] = 5.0
    outputs["start_logits"][0, 5, 3] = outputs["end_logits"][0, 5, 3] = 5.0
    outputs["start_logits"][0, 6, 5] = outputs["end_logits"][0, 6, 5] = 5.0  # ∅: dropped
    outputs["region_logits"][0, 0, 2] = 5.0
    word_mask, region_mask = masks()
    predictions = decode_predictions(outputs, make_config(), word_mask, region_mask)[0]
    assert [(p["start"], p["end"], p["type"], p["type_id"], p["region"]) for p in predictions] == [
        (0, 1, "ORG", 2, 2),
        (3, 3, "PER", 0, 0),
    ]
    p_org = math.exp(3.0) / (math.exp(3.0) + 4.0)
    assert predictions[0]["score"] == pytest.approx(p_org * sigmoid(5.0), rel=1e-5)
    with_threshold = decode_predictions(outputs, make_config(), word_mask, region_mask, threshold=0.5)[0]
    assert [p["type"] for p in with_threshold] == ["ORG"]


@dataclass
class FakeOutput(ModelOutput):
    """A ModelOutput with MQSPNOutput's field names; unset (None) fields are absent from it."""

    loss: Optional[torch.FloatTensor] = None
    existence_logits: Optional[torch.FloatTensor] = None
    class_logits: Optional[torch.FloatTensor] = None
    start_logits: Optional[torch.FloatTensor] = None
    end_logits: Optional[torch.FloatTensor] = None
    region_logits: Optional[torch.FloatTensor] = None
    query_types: Optional[torch.LongTensor] = None
    aux_outputs: Optional[List[dict]] = None


def test_model_output_and_default_query_types_give_plain_python():
    outputs = blank_outputs(queries=8)
    set_query(outputs, 0, 6, 2, 3, 1)  # query 6 has type 6 mod 4 = 2 (ORG)
    word_mask, region_mask = masks()
    from_dict = decode_predictions(outputs, make_config(), word_mask, region_mask)
    without_types = {k: v for k, v in outputs.items() if k != "query_types"}
    model_output = FakeOutput(**without_types)
    assert "class_logits" not in model_output.keys()
    from_output = decode_predictions(model_output, make_config(), word_mask, region_mask)
    assert from_dict == from_output
    (prediction,) = from_output[0]
    assert prediction["type"] == "ORG" and prediction["type_id"] == 2
    assert {k: type(v) for k, v in prediction.items()} == {
        "start": int, "end": int, "type": str, "type_id": int, "region": int, "score": float, "region_score": float
    }


def test_outputs_need_exactly_one_classification_head():
    outputs = blank_outputs()
    outputs["class_logits"] = torch.zeros(1, 8, 5)
    word_mask, region_mask = masks()
    with pytest.raises(ValueError, match="exactly one of 'existence_logits'"):
        decode_predictions(outputs, make_config(), word_mask, region_mask)


def test_pointer_boundaries_decode_from_a_softmax_over_the_words():
    """boundary_activation="softmax": P^s / P^e are one distribution over the words, so the score uses the
    softmax probabilities (not the sigmoids) and the best span is still the argmax pair."""
    outputs = blank_outputs(queries=4, words=5)
    set_query(outputs, 0, 0, 1, 2, 0, existence=math.log(0.9 / 0.1), boundary=3.0)
    outputs["start_logits"][0, 0, 3] = 2.0  # a runner-up start
    word_mask, region_mask = masks(words=5)
    config = make_config(boundary_activation="softmax")
    decoded = decode_predictions(outputs, config, word_mask, region_mask)
    assert [(p["start"], p["end"], p["type"]) for p in decoded[0]] == [(1, 2, "PER")]
    start = torch.softmax(outputs["start_logits"][0, 0], 0)[1].item()
    end = torch.softmax(outputs["end_logits"][0, 0], 0)[2].item()
    assert decoded[0][0]["score"] == pytest.approx(0.9 * math.sqrt(start * end), rel=1e-5)
    sigmoid_score = decode_predictions(outputs, make_config(), word_mask, region_mask)[0][0]["score"]
    assert sigmoid_score == pytest.approx(0.9 * sigmoid(3.0), rel=1e-5) and sigmoid_score != pytest.approx(decoded[0][0]["score"])
