"""MQSPNConfig and MQSPNForGroundedNER on tiny configurations built in code (CPU)."""

import json

import pytest
import torch
from conftest import make_batch, tiny_config, tiny_text_config

from modeling_mqspn import MQSPNConfig, MQSPNForGroundedNER
from modeling_mqspn.configuration_mqspn import ABLATION_SWITCHES
from modeling_mqspn.decoding_mqspn import decode_predictions
from modeling_mqspn.modeling_mqspn import word_tag_targets
from modeling_mqspn.tools.metrics import evaluate_grounded_ner

# Mixed batch: word counts 5/3/7/4, proposal counts 2/0/4/1 (0 included), entity counts 2/0/3/1 (0 included).
WORDS, REGIONS, ENTITIES = [5, 3, 7, 4], [2, 0, 4, 1], [2, 0, 3, 1]


def build(seed=0, **overrides):
    torch.manual_seed(seed)
    return MQSPNForGroundedNER(tiny_config(**overrides))


def inputs_only(batch):
    return {key: value for key, value in batch.items() if key != "labels"}


def assert_every_parameter_has_gradient(model):
    """Every trainable parameter has a gradient, and a non-zero one — except BERT's key biases, whose gradient
    is zero in exact arithmetic (the softmax cancels a bias shared by all keys), so only rounding shows."""
    missing = [
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
        and (
            parameter.grad is None
            or (not name.endswith("attention.self.key.bias") and not bool(parameter.grad.abs().sum() > 0))
        )
    ]
    assert not missing, f"trainable parameters without a non-zero gradient: {missing}"


def logit_keys(config):
    return ["existence_logits" if config.head_mode == "existence" else "class_logits"] + [
        "start_logits",
        "end_logits",
        "region_logits",
    ]


# --------------------------------------------------------------------------------------------- config


def test_config_defaults_reproduce_the_paper():
    config = MQSPNConfig()
    assert config.num_queries == 60 and config.max_regions == 18 and config.num_fusion_layers == 3
    assert config.entity_types == ["PER", "LOC", "ORG", "OTHER"]
    assert config.type_verbalizers == ["person", "location", "organization", "other"]
    assert config.text_config.hidden_size == 768 and config.vision_config.hidden_size == 768
    assert config.vision_config.patch_size == 32  # ViT-B/32
    assert config.fusion_num_heads == 12 and config.fusion_intermediate_size == 3072
    assert config.head_mode == "existence" and config.aggregator_lambda == 0.5
    assert all(getattr(config, switch) for switch in ABLATION_SWITCHES)
    assert config.initializer_range == 0.02 and config.gold_repeat == 0 and config.use_auxiliary_loss
    # w/o PTQ removes only the type queries: the existence head stays (the softmax head is its own switch)
    assert MQSPNConfig(use_type_queries=False).head_mode == "existence"
    assert MQSPNConfig(use_type_queries=False, head_mode="softmax").head_mode == "softmax"


def test_queries_per_type_when_p_does_not_divide_u():
    assert tiny_config(num_queries=10).queries_per_type == {"PER": 3, "LOC": 3, "ORG": 2, "OTHER": 2}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_queries=3), "num_queries=3"),
        (dict(type_verbalizers=["person"]), "one verbaliser per type"),
        (dict(use_type_queries=False, use_entity_queries=False), "no queries"),
        (dict(type_query_rms=0.0), "type_query_rms"),
        (dict(head_mode="sigmoid"), "head_mode"),
        (dict(word_pooling="last"), "word_pooling"),
        (dict(prefix_source="image"), "prefix_source"),
        (dict(fusion_num_heads=5), "fusion_num_heads=5"),
        (dict(prompt_template="{} is a type."), "prompt_template"),
        (dict(word_tagging_loss_weight=-0.5), "word_tagging_loss_weight"),
        (dict(boundary_smoothing=1.0), "boundary_smoothing"),
    ],
)
def test_config_rejects_inconsistent_settings(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_config_round_trips_through_json(tmp_path):
    config = tiny_config(entity_types=["A", "B"], type_verbalizers=["alpha", "beta"], head_mode="softmax")
    config.save_pretrained(tmp_path)
    loaded = MQSPNConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.text_config.hidden_size == 32 and loaded.vision_config.hidden_size == 24


# --------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("pixels", [False, True], ids=["region_features", "pixel_values"])
def test_output_shapes_on_a_mixed_batch(pixels):
    model = build().eval()
    config = model.config
    batch = make_batch(config, WORDS, REGIONS, ENTITIES, pixels=pixels)
    out = model(**batch)
    B, u, n, K = len(WORDS), config.num_queries, max(WORDS), max(REGIONS)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert set(out.loss_dict) == {"loss", "loss_class", "loss_start", "loss_end", "loss_region", "loss_aux"}
    assert out.existence_logits.shape == (B, u) and out.class_logits is None
    assert out.start_logits.shape == out.end_logits.shape == (B, u, n)
    assert out.region_logits.shape == (B, u, K + 1)
    assert out.query_hidden_states.shape == (B, u, config.text_config.hidden_size)
    assert torch.equal(out.query_types, torch.arange(u) % 4)
    assert len(out.aux_outputs) == config.num_fusion_layers - 1
    for layer in out.aux_outputs:
        assert {key: tuple(layer[key].shape) for key in logit_keys(config)} == {
            "existence_logits": (B, u),
            "start_logits": (B, u, n),
            "end_logits": (B, u, n),
            "region_logits": (B, u, K + 1),
        }
    # Padding words and padding proposals have probability 0; the ungroundable column never does.
    for b in range(B):
        assert (out.start_logits[b, :, WORDS[b]:].sigmoid() == 0).all()
        assert (out.end_logits[b, :, : WORDS[b]].sigmoid() > 0).all()
        assert (out.region_logits[b, :, 1 + REGIONS[b]:].sigmoid() == 0).all()
        assert (out.region_logits[b, :, : 1 + REGIONS[b]].sigmoid() > 0).all()
    # Without labels there is no loss, and the logits do not depend on them.
    plain = model(**inputs_only(batch))
    assert plain.loss is None and plain.loss_dict is None
    torch.testing.assert_close(plain.start_logits, out.start_logits)


def test_pixel_values_and_precomputed_features_agree():
    model = build().eval()
    batch = make_batch(model.config, WORDS, REGIONS, ENTITIES, pixels=True)
    from_pixels = model(**inputs_only(batch))
    pixel_values = batch.pop("pixel_values")
    features = torch.zeros(len(WORDS), max(REGIONS), model.config.vision_config.hidden_size)
    features[batch["region_mask"]] = model.encode_regions(pixel_values[batch["region_mask"]])
    from_features = model(**inputs_only(batch), region_features=features)
    torch.testing.assert_close(from_features.region_logits, from_pixels.region_logits)
    torch.testing.assert_close(from_features.existence_logits, from_pixels.existence_logits)


def test_padding_does_not_change_a_tweets_predictions():
    """A tweet alone and the same tweet inside a padded batch give the same logits on its own positions."""
    model = build().eval()
    batch = make_batch(model.config, WORDS, REGIONS, ENTITIES)
    together = model(**inputs_only(batch))
    b = 2  # the tweet with the most words and proposals
    alone = {
        key: (value[b : b + 1] if key != "labels" else None)
        for key, value in batch.items()
        if key != "labels"
    }
    single = model(**alone)
    torch.testing.assert_close(single.start_logits[0], together.start_logits[b, :, : WORDS[b]])
    torch.testing.assert_close(single.region_logits[0], together.region_logits[b, :, : REGIONS[b] + 1])
    torch.testing.assert_close(single.existence_logits[0], together.existence_logits[b])


def test_batch_without_any_proposal():
    model = build().eval()
    batch = make_batch(model.config, [4, 6], [0, 0], [1, 2])
    del batch["region_features"]
    out = model(**batch)
    assert out.region_logits.shape == (2, model.config.num_queries, 1)
    assert torch.isfinite(out.loss)
    no_mask = model(**{**inputs_only(batch), "region_mask": None})
    torch.testing.assert_close(no_mask.region_logits, out.region_logits)


def test_bfloat16_forward_and_backward():
    """Masked logits use a dtype-safe large negative value; the loss stays finite in bfloat16."""
    model = build().to(torch.bfloat16).train()
    batch = make_batch(model.config, WORDS, REGIONS, ENTITIES, pixels=True)
    out = model(**batch)
    assert out.start_logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert torch.isfinite(out.existence_logits).all()
    assert (out.region_logits[1, :, 1:].float().sigmoid() == 0).all()  # tweet 1 has no proposal
    out.loss.backward()
    assert_every_parameter_has_gradient(model)


@pytest.mark.parametrize("pooling", ["max", "first", "mean"])
def test_word_pooling(pooling):
    model = build(word_pooling=pooling).eval()
    batch = make_batch(model.config, WORDS, REGIONS, ENTITIES)
    words = model.encode_words(batch["input_ids"], batch["attention_mask"], batch["word_ids"], batch["word_mask"])
    states = model.text_encoder(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    reduce = {"max": lambda s: s.max(0).values, "first": lambda s: s[0], "mean": lambda s: s.mean(0)}[pooling]
    for b, count in enumerate(WORDS):
        for w in range(count):
            expected = reduce(states[b][batch["word_ids"][b] == w])
            torch.testing.assert_close(words[b, w], expected)
        assert (words[b, count:] == 0).all()


def test_a_word_without_sub_words_is_an_error():
    model = build().eval()
    batch = make_batch(model.config, [3, 2], [1, 1], [0, 0])
    batch["word_mask"][1, 2] = True  # tweet 1 has 2 words; word 2 has no sub-word
    with pytest.raises(ValueError, match=r"\(1, 2\)"):
        model(**inputs_only(batch))


def test_bad_region_inputs_are_errors():
    model = build().eval()
    batch = make_batch(model.config, [3, 2], [2, 1], [0, 0], pixels=True)
    with pytest.raises(ValueError, match="not both"):
        model(**inputs_only(batch), region_features=torch.zeros(2, 2, 24))
    without_pixels = {k: v for k, v in inputs_only(batch).items() if k != "pixel_values"}
    with pytest.raises(ValueError, match="neither pixel_values nor region_features"):
        model(**without_pixels)
    with pytest.raises(ValueError, match="width 7"):
        model(**without_pixels, region_features=torch.zeros(2, 2, 7))


def test_labels_reach_the_loss_with_the_sample_id():
    """Too many entities of one type for its queries: the loss reports the tweet's id."""
    model = build().eval()
    batch = make_batch(model.config, [6, 3], [1, 0], [0, 1])
    label = batch["labels"][0]
    label.update(  # three PER entities, but PER has only two of the eight queries
        start=torch.tensor([0, 2, 4]), end=torch.tensor([1, 3, 5]), type=torch.tensor([0, 0, 0]),
        regions=torch.tensor([[True, False]] * 3),
    )
    with pytest.raises(ValueError, match="tweet-0"):
        model(**batch)


# --------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    "words, regions, entities",
    [(WORDS, REGIONS, ENTITIES), ([4, 2, 5], [0, 0, 0], [0, 0, 0]), ([4, 2], [3, 1], [0, 0])],
    ids=["with-entities", "no-entities-no-proposals", "no-entities"],
)
def test_loss_is_finite_and_every_trainable_parameter_gets_a_gradient(words, regions, entities):
    """DDP without find_unused_parameters needs a non-zero gradient on every trainable parameter on every
    step, including a batch without entities and a batch without proposals."""
    model = build().train()
    batch = make_batch(model.config, words, regions, entities, pixels=True)
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    assert_every_parameter_has_gradient(model)
    assert all(not p.requires_grad and p.grad is None for p in model.vision_model.parameters())


def test_word_tag_targets_are_bio_tags_of_the_gold_spans():
    labels = [
        {"start": torch.tensor([3, 0]), "end": torch.tensor([3, 1]), "type": torch.tensor([0, 2])},
        {"start": torch.tensor([], dtype=torch.long), "end": torch.tensor([], dtype=torch.long),
         "type": torch.tensor([], dtype=torch.long)},
        {"start": torch.tensor([1]), "end": torch.tensor([3]), "type": torch.tensor([3])},
    ]
    word_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    # O = 0, B-t = 1 + 2t, I-t = 2 + 2t
    expected = torch.tensor([[5, 6, 0, 1, 0], [0, 0, 0, 0, 0], [0, 7, 8, 8, 0]])
    assert torch.equal(word_tag_targets(labels, word_mask, num_types=4), expected)
    with pytest.raises(ValueError, match="Batch index 0: entity type 4"):
        word_tag_targets([{"start": torch.tensor([0]), "end": torch.tensor([0]), "type": torch.tensor([4])}],
                         word_mask[:1], num_types=4)


def test_word_tagging_loss_adds_its_weighted_term_and_leaves_decoding_alone(tmp_path):
    """The option adds weight x the tagger's cross-entropy to the set loss, trains the tagger and the text
    encoder through it, never changes the logits decoding reads, and survives save / load."""
    assert build().word_tagger is None  # off by default: the paper's model
    model = build(word_tagging_loss_weight=0.5).eval()
    batch = make_batch(model.config, WORDS, REGIONS, ENTITIES, pixels=True)
    with_tagger = model(**batch)
    tagger, model.word_tagger = model.word_tagger, None
    without = model(**batch)
    model.word_tagger = tagger
    assert with_tagger.loss_dict["loss_tagging"] > 0
    torch.testing.assert_close(with_tagger.loss, without.loss + 0.5 * with_tagger.loss_dict["loss_tagging"])
    torch.testing.assert_close(with_tagger.loss_dict["loss"], with_tagger.loss)
    for key in logit_keys(model.config):
        assert torch.equal(getattr(with_tagger, key), getattr(without, key))

    model.zero_grad()
    tagging_only = with_tagger.loss - without.loss
    tagging_only.backward()
    assert model.word_tagger.weight.grad.abs().sum() > 0
    assert model.text_encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in model.fusion_layers.parameters())

    model.save_pretrained(tmp_path)
    loaded = MQSPNForGroundedNER.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.word_tagger.weight, model.word_tagger.weight)
    torch.testing.assert_close(loaded(**batch).loss, with_tagger.loss, rtol=0, atol=0)


def test_vision_tower_is_frozen_and_stays_in_eval_mode():
    model = build().train()
    assert model.training and not model.vision_model.training
    assert model.text_encoder.training
    vision_before = {k: v.clone() for k, v in model.vision_model.state_dict().items()}
    buffers_before = (model.type_queries.clone(), model.ungroundable_embedding.clone())
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for seed in range(2):
        batch = make_batch(model.config, WORDS, REGIONS, ENTITIES, seed=seed, pixels=True)
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    for key, value in model.vision_model.state_dict().items():
        assert torch.equal(value, vision_before[key]), key
    assert torch.equal(model.type_queries, buffers_before[0])
    assert torch.equal(model.ungroundable_embedding, buffers_before[1])
    unchanged = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, trainable_before[n])]
    assert not unchanged


ABLATIONS = {
    "w/o PTQ": dict(use_type_queries=False),
    "w/o PTQ, existence head": dict(use_type_queries=False, head_mode="existence"),
    "w/o LEQ": dict(use_entity_queries=False),
    "w/o QCT": dict(use_query_text_attention=False),
    "w/o QPI": dict(use_prefix_integration=False),
    "w/o SAG": dict(use_similarity_aggregator=False),
    "w/o BML": dict(use_bipartite_matching=False),
    "softmax head": dict(head_mode="softmax"),
    "text prefix": dict(prefix_source="text"),
    "plain SAG output": dict(aggregator_residual=False),
    "no auxiliary loss": dict(use_auxiliary_loss=False),
    "gold repeat": dict(gold_repeat=6),
    "all ablations": dict(
        use_entity_queries=False,
        use_query_text_attention=False,
        use_prefix_integration=False,
        use_similarity_aggregator=False,
        use_bipartite_matching=False,
    ),
}


@pytest.mark.parametrize("overrides", list(ABLATIONS.values()), ids=list(ABLATIONS))
def test_every_ablation_trains_a_step(overrides):
    model = build(**overrides).train()
    config = model.config
    batch = make_batch(config, WORDS, REGIONS, ENTITIES)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert_every_parameter_has_gradient(model)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert torch.isfinite(model(**batch).loss)
    for layer in (out.aux_outputs or []) + [out]:
        get = layer.get if isinstance(layer, dict) else lambda key: getattr(out, key)
        assert all(get(key) is not None for key in logit_keys(config))
    if config.head_mode == "softmax":
        assert out.class_logits.shape == (4, config.num_queries, 5) and out.existence_logits is None
    assert (out.aux_outputs is None) == (not config.use_auxiliary_loss)


def test_ablation_switches_remove_their_modules():
    """Each Table 3 switch removes exactly its part, so no parameter is left without a gradient."""
    full = build()
    names = {name for name, _ in full.named_parameters()}
    removed = {
        "use_entity_queries": "entity_queries",
        "use_query_text_attention": ".cross_attention.",
        "use_prefix_integration": ".prefix_key_proj.",
        "use_similarity_aggregator": ".similarity_aggregator.",
    }
    for switch, fragment in removed.items():
        assert any(fragment in name for name in names)
        ablated = {name for name, _ in build(**{switch: False}).named_parameters()}
        assert not any(fragment in name for name in ablated), switch
        assert ablated < names


def test_query_set_composition():
    """H_Q = LEQ + tiled PTQ (Eq. 2); w/o PTQ the type queries are not used; w/o LEQ the frozen per-slot
    queries (slot prompt states + a fixed sinusoidal slot code) are."""
    from modeling_mqspn.modeling_mqspn import sinusoidal_slot_code

    def rescaled(m, rms=0.02):
        return m.type_queries * rms / m.type_queries.pow(2).mean().sqrt()

    def slots(m, rms=0.02):
        return m.slot_queries * rms / m.slot_queries.pow(2).mean().sqrt() + rms * sinusoidal_slot_code(8, 32)

    for overrides, expected in [
        ({}, lambda m: m.entity_queries + rescaled(m)[torch.arange(8) % 4]),
        (dict(type_query_rms=None), lambda m: m.entity_queries + m.type_queries[torch.arange(8) % 4]),
        (dict(type_query_rms=0.5), lambda m: m.entity_queries + rescaled(m, 0.5)[torch.arange(8) % 4]),
        (dict(use_type_queries=False), lambda m: m.entity_queries),
        (dict(use_entity_queries=False), slots),
    ]:
        model = build(**overrides)
        queries = model.multi_grained_queries(3)
        assert queries.shape == (3, 8, 32)
        torch.testing.assert_close(queries[1], expected(model))


def test_bipartite_matching_switch_changes_the_assignment():
    """w/o BML gives the fixed assignment's loss, which differs from the Hungarian one on the same weights."""
    hungarian = build(seed=3).eval()
    fixed = build(seed=3, use_bipartite_matching=False).eval()
    fixed.load_state_dict(hungarian.state_dict())
    batch = make_batch(hungarian.config, WORDS, REGIONS, ENTITIES)
    loss_hungarian, loss_fixed = hungarian(**batch).loss, fixed(**batch).loss
    assert loss_hungarian < loss_fixed  # the Hungarian assignment minimises the matching cost


# --------------------------------------------------------------------------------------------- save / load


def test_save_and_load_give_identical_outputs(tmp_path):
    model = build().eval()
    batch = make_batch(model.config, WORDS, REGIONS, ENTITIES, pixels=True)
    expected = model(**batch)
    model.save_pretrained(tmp_path)
    files = sorted(path.name for path in tmp_path.iterdir())
    assert "model.safetensors" in files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl"))]
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert saved_config["auto_map"] == {
        "AutoConfig": "configuration_mqspn.MQSPNConfig",
        "AutoModel": "modeling_mqspn.MQSPNForGroundedNER",
    }
    loaded = MQSPNForGroundedNER.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.type_queries, model.type_queries)
    assert torch.equal(loaded.ungroundable_embedding, model.ungroundable_embedding)
    assert not any(p.requires_grad for p in loaded.vision_model.parameters())
    got = loaded(**batch)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)
    for key in logit_keys(model.config):
        torch.testing.assert_close(getattr(got, key), getattr(expected, key), rtol=0, atol=0)
    assert not loaded.train().vision_model.training


def test_feature_only_checkpoint(tmp_path):
    """include_vision_tower=False drops the tower: it accepts region features only, and is smaller."""
    model = build(include_vision_tower=False).eval()
    assert model.vision_model is None
    batch = make_batch(model.config, WORDS, REGIONS, ENTITIES)
    expected = model(**batch)
    model.save_pretrained(tmp_path)
    loaded = MQSPNForGroundedNER.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(**batch).region_logits, expected.region_logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="include_vision_tower=False"):
        loaded.encode_regions(torch.zeros(1, 3, 32, 32))
    assert not any(name.startswith("vision_model.") for name in loaded.state_dict())


# --------------------------------------------------------------------------------------------- overfitting


def synthetic_tweets(config):
    """8 fixed tweets: 3-8 words, 0-4 proposals with distinct features, 0-3 entities, grounded and not."""
    return make_batch(config, [6, 4, 7, 5, 8, 3, 6, 5], [3, 0, 2, 4, 1, 0, 2, 3], [2, 1, 3, 0, 2, 1, 1, 2], seed=1)


def proposal_box(region):
    """Pixel box of 1-based proposal `region`: disjoint squares, so IoU ≥ 0.5 only with itself."""
    return [60.0 * (region - 1), 0.0, 60.0 * (region - 1) + 50.0, 50.0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "type_query_scale, boundary_activation",
    [(0.02, "sigmoid"), (1.0, "sigmoid"), (0.02, "softmax")],
    ids=["placeholder-ptq", "layernorm-scale-ptq", "pointer-boundaries"],
)
def test_overfits_eight_tweets_to_gmner_f1_one(type_query_scale, boundary_activation):
    """Also with type queries of the magnitude real [MASK] states have (LayerNorm outputs, RMS ≈ 1), which
    `type_query_rms` brings back to the entity queries' scale, and with the softmax (pointer) boundaries."""
    torch.manual_seed(0)
    config = tiny_config(
        boundary_activation=boundary_activation,
        fusion_dropout=0.0,
        text_config=tiny_text_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    )
    model = MQSPNForGroundedNER(config)
    with torch.no_grad():
        model.type_queries.normal_(0.0, type_query_scale)
    batch = synthetic_tweets(config)
    references = []
    for b, label in enumerate(batch["labels"]):
        entities = []
        for start, end, etype, regions in zip(label["start"], label["end"], label["type"], label["regions"]):
            region = int(regions.nonzero()[0])
            boxes = [proposal_box(region)] if region else []
            entities.append({"start": int(start), "end": int(end), "type": config.entity_types[etype], "boxes": boxes})
        references.append({"id": label["id"], "entities": entities})
    gold = [entity for reference in references for entity in reference["entities"]]
    assert len(gold) == 12 and any(e["boxes"] for e in gold) and not all(e["boxes"] for e in gold)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(1, 201):
        model.train()
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
        if step % 10 == 0:
            model.eval()
            with torch.no_grad():
                outputs = model(**inputs_only(batch))
            decoded = decode_predictions(outputs, config, batch["word_mask"], batch["region_mask"])
            predictions = [
                {
                    "id": label["id"],
                    "entities": [
                        {"start": e["start"], "end": e["end"], "type": e["type"],
                         "box": proposal_box(e["region"]) if e["region"] else None}
                        for e in tweet
                    ],
                }
                for label, tweet in zip(batch["labels"], decoded)
            ]
            scores = evaluate_grounded_ner(predictions, references)["gmner"]
            if scores["f1"] == 1.0:
                break
    assert scores["f1"] == 1.0, f"GMNER F1 {scores['f1']:.3f} after {step} steps: {scores['counts']}"
