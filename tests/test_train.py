"""End-to-end tests of ``examples/train.py`` through ``accelerate launch`` (issue #4) on a small demo
release generated in code, with a tiny model and a tokenizer built from the data's own words.

- one process: the loss falls, the vision tower never runs inside the loop (every crop comes from
  the feature cache, the second epoch included), the best checkpoint loads back with
  ``from_pretrained`` and predicts from pixels what the run predicted from cached features, and a
  test split gets predictions and scores;
- two CPU processes (gloo, real data parallelism): every dev and test tweet is predicted exactly
  once although the split sizes are odd, one best checkpoint is written, and the pretrained text
  encoder stays untouched during its frozen epoch and changes after it (DDP without
  ``find_unused_parameters``);
- interrupted mid-epoch and resumed from the saved state, training ends with the same weights (and the
  same weight average, ``--ema_decay``, which is what ``best/`` holds) as an uninterrupted run with the
  same seed.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port, run_process
from modeling_mqspn import MQSPNForGroundedNER
from modeling_mqspn.tools.demo_data import DemoDataConfig, generate_demo_release
from modeling_mqspn.processing_mqspn import MQSPNProcessor
from modeling_mqspn.interface_mqspn import select_model_inputs

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "examples" / "train.py")
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
# Every training subprocess: CPU only (data parallelism over gloo), one thread, nothing from the Hub.
ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1"}
NUM_TRAIN, NUM_DEV, NUM_TEST = 24, 7, 5  # odd dev and test sizes: shards of 4 + 3 and 3 + 2
TINY_MODEL = {
    "text_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                    "max_position_embeddings": 64},
    "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "image_size": 16, "patch_size": 8},
    "num_queries": 8,
    "num_fusion_layers": 1,
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small demo release and a word-level BERT tokenizer over its words (saved to a folder)."""
    from transformers import BertTokenizerFast

    root = tmp_path_factory.mktemp("train")
    data = root / "data"
    generate_demo_release(
        data, seed=3, config=DemoDataConfig(num_train=NUM_TRAIN, num_dev=NUM_DEV, num_test=NUM_TEST,
                                            min_image_size=48, max_image_size=64)
    )
    words = set()
    for split in ("train", "dev", "test"):
        for line in (data / f"{split}.txt").read_text(encoding="utf-8").splitlines():
            if line and not line.startswith("IMGID:"):
                words.add(line.split("\t")[0].lower())
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words) + ["person", "location",
                     "organization", "other", "is", "an", "entity", "type", "about", "."]) + "\n", encoding="utf-8")
    tokenizer_dir = root / "tokenizer"
    BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True).save_pretrained(tokenizer_dir)
    return {"root": root, "data": data, "tokenizer": tokenizer_dir}


def train_command(demo, output_dir, *extra, processes=1):
    if processes == 1:
        launch = [ACCELERATE, "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no"]
    else:
        launch = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    return launch + [
        TRAIN, "--config", str(ROOT / "configuration" / "demo.json"),
        "--data_dir", str(demo["data"]), "--tokenizer", str(demo["tokenizer"]), "--output_dir", str(output_dir),
        "--feature_cache_dir", str(demo["root"] / "region_features"),
        "--model_config", json.dumps(TINY_MODEL), "--batch_size", "8", "--eval_batch_size", "3",
        "--learning_rate", "3e-3", "--logging_steps", "1", "--checkpointing_steps", "epoch", "--seed", "7", *extra,
    ]


def run(command, check=True, **env):
    """Run ``command`` from the repository root with ENV (plus ``env``); with ``check``, it must succeed."""
    done = run_process(command, cwd=ROOT, env={**ENV, **env}, timeout=600)
    if check:
        assert done.returncode == 0, f"{' '.join(command)}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-6000:]}"
    return done


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def split_ids(demo, split):
    lines = (demo["data"] / f"{split}.txt").read_text(encoding="utf-8").splitlines()
    return [line[len("IMGID:"):] for line in lines if line.startswith("IMGID:")]


def test_single_process_run_learns_caches_regions_and_saves_a_loadable_model(demo, tmp_path):
    out = tmp_path / "run"
    run(train_command(demo, out, "--num_epochs", "4"))
    records = read_jsonl(out / "metrics.jsonl")

    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 * 3  # 24 tweets / batch 8 = 3 steps per epoch, logged every step
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3])  # last epoch against the first

    # The frozen tower ran only to fill the cache (once per distinct crop), never inside the loop.
    precomputed = [r for r in records if r.get("event") == "region_features"]
    assert {r["split"] for r in precomputed} == {"train", "dev", "test"}
    assert all(r["misses"] + r["hits"] == r["boxes"] for r in precomputed)
    evaluations = [r for r in records if r.get("split") == "dev" and "scores" in r]
    assert [r["epoch"] for r in evaluations] == [0, 1, 2, 3]
    assert [r["vision_tower_calls"] for r in evaluations] == [0, 0, 0, 0]

    # The best checkpoint loads back alone and, from pixels, predicts what the run predicted from
    # the cached features for the same dev tweets.
    best = out / "best"
    assert (best / "model.safetensors").is_file() and not list(best.glob("*.bin"))
    model = MQSPNForGroundedNER.from_pretrained(best).eval()
    processor = MQSPNProcessor.from_pretrained(best)
    dev_rows = {row["id"]: row for row in read_jsonl(out / "dev_references.jsonl")}
    saved = read_jsonl(out / "dev_predictions.jsonl")
    assert [row["id"] for row in saved] == split_ids(demo, "dev")
    ids = [row["id"] for row in saved]
    words = [[] for _ in ids]
    for split_line in (demo["data"] / "dev.txt").read_text(encoding="utf-8").split("\n\n"):
        lines = split_line.strip().splitlines()
        if lines:
            words[ids.index(lines[0][len("IMGID:"):])] = [line.split("\t")[0] for line in lines[1:]]
    inputs = processor(words=words, images=[str(demo["data"] / "images" / f"{i}.jpg") for i in ids],
                       boxes=[dev_rows[i]["proposals"] for i in ids], ids=ids)
    with torch.no_grad():
        outputs = model(**select_model_inputs(inputs, with_labels=False))
    # The threshold chosen on dev after training is in best/config.json and decodes the reloaded model; the
    # dev predictions of the best epoch were decoded at the default (the demo recipe's softmax head: none).
    calibration = json.loads((out / "dev_results.json").read_text())["threshold_calibration"]
    assert calibration["field"] == "softmax_threshold" and calibration["default"] is None
    assert calibration["chosen_f1"] >= calibration["default_f1"]
    assert 0.0 <= calibration["cross_fitted_f1"] <= 1.0 and len(calibration["cross_fitted_thresholds"]) == 2
    assert model.config.softmax_threshold == calibration["chosen"]
    calibrated = [r for r in records if r.get("event") == "threshold_calibration"]
    assert len(calibrated) == 1 and calibrated[0]["chosen"] == calibration["chosen"]
    by_default = processor.post_process_grounded_ner(outputs, inputs, config=model.config)
    by_chosen = processor.post_process_grounded_ner(outputs, inputs, config=model.config,
                                                   threshold=calibration["chosen"] or 0.0)
    assert by_default == by_chosen
    predicted = processor.post_process_grounded_ner(outputs, inputs, config=model.config, threshold=0.0)
    for row, entities in zip(saved, predicted):
        assert [(e["start"], e["end"], e["type"]) for e in entities] == [
            (e["start"], e["end"], e["type"]) for e in row["entities"]
        ]
        for ours, theirs in zip(entities, row["entities"]):
            assert (ours["box"] is None) == (theirs["box"] is None)
            if ours["box"] is not None:
                assert ours["box"] == pytest.approx(theirs["box"])
            assert ours["score"] == pytest.approx(theirs["score"], abs=1e-4)

    assert [row["id"] for row in read_jsonl(out / "test_predictions.jsonl")] == split_ids(demo, "test")
    test_results = json.loads((out / "test_results.json").read_text())
    assert set(test_results) >= {"gmner", "mner", "eeg"}


def test_two_processes_evaluate_every_tweet_once_and_keep_the_text_encoder_frozen(demo, tmp_path):
    from accelerate.utils import set_seed

    from modeling_mqspn.tools.training import build_model_and_processor

    # Save a small "pretrained" text encoder so that --text_encoder takes the pretrained path.
    set_seed(0)
    fields = {**TINY_MODEL, "entity_types": ["PER", "LOC", "ORG", "OTHER"]}
    seed_model, seed_processor = build_model_and_processor(None, None, None, str(demo["tokenizer"]), fields)
    encoder_dir = tmp_path / "text_encoder"
    seed_model.text_encoder.save_pretrained(encoder_dir)
    seed_processor.tokenizer.save_pretrained(encoder_dir)
    initial = {k: v.clone() for k, v in seed_model.text_encoder.state_dict().items()}

    out = tmp_path / "run"
    done = run(train_command(demo, out, "--num_epochs", "2", "--freeze_text_epochs", "1", "--text_encoder",
                             str(encoder_dir), processes=2))
    records = read_jsonl(out / "metrics.jsonl")
    start = [r for r in records if r.get("event") == "start"]
    assert len(start) == 1 and start[0]["num_processes"] == 2 and start[0]["per_device_batch_size"] == 4

    # Every dev / test tweet exactly once, in dataset order, one evaluation record per epoch.
    assert [row["id"] for row in read_jsonl(out / "dev_predictions.jsonl")] == split_ids(demo, "dev")
    assert [row["id"] for row in read_jsonl(out / "test_predictions.jsonl")] == split_ids(demo, "test")
    assert [r["epoch"] for r in records if r.get("split") == "dev" and "scores" in r] == [0, 1]
    assert len([r for r in records if r.get("split") == "test" and "scores" in r]) == 1
    assert len(list((out / "best").glob("*.safetensors"))) == 1, done.stdout

    # Epoch 0: the text encoder is frozen (lr 0, gradients dropped); epoch 1 trains it.
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert [json.loads((c / "trainer_state.json").read_text())["epoch"] for c in checkpoints] == [1, 2]
    prefix = "text_encoder."
    for index, checkpoint in enumerate(checkpoints):
        weights = load_file(checkpoint / "model.safetensors")
        text = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        assert set(text) == set(initial)
        unchanged = all(torch.equal(text[k], initial[k]) for k in initial)
        assert unchanged == (index == 0)


def test_resume_mid_epoch_ends_with_the_same_weights(demo, tmp_path):
    """With a weight average (--ema_decay): the resumed run also ends with the same average, the average
    is what best/ holds, and it is not the trained weights."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run(train_command(demo, whole, "--num_epochs", "2", "--ema_decay", "0.5"))
    # 3 steps per epoch: stopping after step 4 interrupts the second epoch after its first batch.
    run(train_command(demo, parts, "--num_epochs", "2", "--ema_decay", "0.5", "--stop_after_steps", "4"))
    stopped = sorted((parts / "checkpoints").iterdir())
    assert [json.loads((c / "trainer_state.json").read_text())["batches_in_epoch"] for c in stopped] == [0, 1]
    assert not (parts / "test_results.json").exists()
    run(train_command(demo, parts, "--num_epochs", "2", "--ema_decay", "0.5", "--resume_from_checkpoint", "latest"))

    final_whole = load_file(whole / "checkpoints" / "step_00000006" / "model.safetensors")
    final_parts = load_file(parts / "checkpoints" / "step_00000006" / "model.safetensors")
    assert set(final_whole) == set(final_parts)
    for name in final_whole:
        torch.testing.assert_close(final_parts[name], final_whole[name], rtol=0, atol=1e-6, msg=name)
    first_step = load_file(whole / "checkpoints" / "step_00000003" / "model.safetensors")
    assert any(not torch.equal(first_step[name], final_whole[name]) for name in final_whole)
    whole_dev = [r["scores"] for r in read_jsonl(whole / "metrics.jsonl") if "scores" in r]
    parts_dev = [r["scores"] for r in read_jsonl(parts / "metrics.jsonl") if "scores" in r]
    assert whole_dev == parts_dev

    def average(run_dir, step):  # the scheduler is custom state 0, the average 1 (tensors only)
        state = torch.load(run_dir / "checkpoints" / f"step_{step:08d}" / "custom_checkpoint_1.pkl", weights_only=True)
        assert state.pop("n_averaged").item() == step  # one update per optimiser step
        return {name[len("module."):]: tensor for name, tensor in state.items()}

    average_whole, average_parts = average(whole, 6), average(parts, 6)
    for name in final_whole:
        torch.testing.assert_close(average_parts[name], average_whole[name], rtol=0, atol=1e-6, msg=name)
    assert any(not torch.allclose(average_whole[name], final_whole[name]) for name in final_whole)
    best_epoch = json.loads((whole / "dev_results.json").read_text())["epoch"]
    saved = load_file(whole / "best" / "model.safetensors")
    at_best = average(whole, 3 * (best_epoch + 1))
    for name in saved:
        torch.testing.assert_close(saved[name], at_best[name], rtol=0, atol=0, msg=name)
