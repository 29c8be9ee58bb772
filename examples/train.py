"""Train MQSPN with Accelerate (paper §"Implementation Details"; docs/DESIGN.md §9).

    accelerate launch examples/train.py --config configuration/twitter_gmner.json
    accelerate launch examples/train.py --config configuration/demo.json --num_epochs 3
    ACCELERATE_USE_CPU=1 accelerate launch --config_file configuration/accelerate/cpu_2proc.yaml \\
        examples/train.py --config configuration/demo.json

A recipe (JSON, ``configuration/``) sets every option below; ``--key value`` on the command line
overrides it (``--model_config '{"use_type_queries": false}'`` merges into the recipe's
``model_config``; ``none`` / ``null`` give None). Read top to bottom: arguments, data, model, region
features, optimiser and schedule, the loop, evaluation, checkpoints.

Outputs in ``output_dir``: ``metrics.jsonl`` (one JSON object per logging step and per evaluation),
``best/`` (the best dev GMNER F1 model and processor, ``save_pretrained``, safetensors; with ``--ema_decay``
the weight average is what is evaluated and saved, docs/DEVIATIONS.md),
``dev_predictions.jsonl`` (of the best epoch), ``dev_references.jsonl``, with a test split
``test_predictions.jsonl``, ``test_references.jsonl`` and ``test_results.json``;
``checkpoints/step_*`` (``accelerator.save_state`` + ``trainer_state.json``; the newest
``--save_total_limit`` kept) for ``--resume_from_checkpoint``; ``metrics.png`` (loss and dev F1, also
``examples/plot_metrics.py``). A resumed run continues ``metrics.jsonl`` from the checkpoint (the
records written after it are cut, none duplicated) and its ``seconds`` from the checkpoint's.

Faults (docs/robustness.md). A non-finite loss on any process skips its whole optimiser step on every
process (gradients dropped, no optimiser or schedule step), is logged (``"event": "non_finite_loss"``)
and counted in ``trainer_state.json``; ``--max_non_finite_steps`` of them stop the run with an error.
Checkpoints and ``best/`` are written to a ``.partial`` folder and renamed into place, result files
through a temporary file, so a killed run (even ``kill -9``) leaves only complete ones; the next run
cleans up what the kill left and ``--resume_from_checkpoint latest`` completes the run.
"""

import argparse
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
import traceback

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from modeling_mqspn import MQSPNConfig, MQSPNForGroundedNER
from modeling_mqspn.configuration_mqspn import DEFAULT_MAX_REGIONS
from modeling_mqspn.interface_mqspn import select_model_inputs
from modeling_mqspn.tools.batching import train_sampler
from modeling_mqspn.tools.calibration import calibrate_best_checkpoint
from modeling_mqspn.tools.cli import UsageError, closest, run_cli
from modeling_mqspn.tools.data import write_references_jsonl
from modeling_mqspn.tools.export import save_checkpoint
from modeling_mqspn.tools.feature_cache import RegionFeatureCache
from modeling_mqspn.tools.metrics import evaluate_grounded_ner, format_results_table
from modeling_mqspn.tools.plot import plot_metrics
from modeling_mqspn.tools.recipe_checks import check_query_capacity, count_uncovered, resolve_type_query_counts
from modeling_mqspn.tools.regions import report_proposal_coverage
from modeling_mqspn.tools.training import (
    ADAMW_IMPLEMENTATIONS,
    DATASET_FORMATS,
    GroundedNERCollator,
    build_model_and_processor,
    check_arguments,
    check_label_space,
    drop_gradients,
    entity_types_of,
    finite_on_every_process,
    limit_samples,
    metrics_size,
    prune_checkpoints,
    rewind_metrics,
    run_summary,
    load_recipe,
    load_splits,
    make_adamw,
    make_schedule,
    make_weight_average,
    merge_recipe,
    parameter_groups,
    recover_folder,
    replace_folder,
    set_text_encoder_frozen,
    write_text_atomically,
)

# --------------------------------------------------------------------------------------------------
# Arguments: every recipe key, its default (docs/DESIGN.md §9 where the paper fixes it) and its meaning.


def optional(kind):
    """An argparse type that also accepts ``none`` / ``null`` for None."""

    def convert(text):
        return None if text.lower() in ("none", "null") else kind(text)

    convert.__name__ = kind.__name__
    return convert


def boolean(text):
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def steps_or_epoch(text):
    if text.lower() in ("none", "null"):
        return None
    if text == "epoch":
        return text
    return int(text)


OPTIONS = {
    # data
    "dataset_format": ("twitter-gmner", str, f"one of {DATASET_FORMATS}"),
    "data_dir": (None, optional(str), "release folder (train.txt, dev.txt, [test.txt], xml/, images/, vinvl/) or saved DatasetDict"),
    "train_file": (None, optional(str), "JSONL training split (dataset_format jsonl)"),
    "dev_file": (None, optional(str), "JSONL dev split"),
    "test_file": (None, optional(str), "JSONL test split (optional)"),
    "xml_dir": (None, optional(str), "Pascal VOC folder (default data_dir/xml)"),
    "images_dir": (None, optional(str), "image folder (default data_dir/images)"),
    "vinvl_dir": (None, optional(str), "VinVL .npz folder (default data_dir/vinvl)"),
    "fmnerg_label_level": ("coarse", str, "Twitter-FMNERG labels: coarse, fine or gmner"),
    "max_train_samples": (None, optional(int), "train on the first N training tweets only (quick runs)"),
    "max_eval_samples": (None, optional(int), "evaluate on the first N dev and test tweets only"),
    # model
    "model_name_or_path": (None, optional(str), "an MQSPN checkpoint to continue training"),
    "text_encoder": ("bert-base-cased", optional(str), "pretrained BERT-family encoder (name or folder); none = random init from model_config.text_config"),
    "vision_encoder": ("openai/clip-vit-base-patch32", optional(str), "pretrained CLIP (vision) checkpoint; none = random tower from model_config.vision_config"),
    "tokenizer": (None, optional(str), "tokenizer for a randomly initialised text encoder"),
    "model_config": ({}, json.loads, "MQSPNConfig fields as JSON, merged into the recipe's"),
    # optimisation
    "learning_rate": (2e-5, float, "AdamW learning rate of the text encoder (and of everything by default)"),
    "new_layers_learning_rate": (None, optional(float), "learning rate of the randomly initialised layers (default: learning_rate)"),
    "weight_decay": (0.01, float, "AdamW weight decay of the weight matrices"),
    "adamw_implementation": ("fused", str, f"AdamW kernel, one of {ADAMW_IMPLEMENTATIONS}: fused is the fastest on CPU and CUDA"),
    "max_grad_norm": (1.0, optional(float), "gradient clipping norm (none = off)"),
    "warmup_ratio": (0.05, float, "fraction of the optimiser steps with linear warm-up"),
    "num_epochs": (50, int, "training epochs"),
    "batch_size": (16, int, "tweets per optimiser step across all processes and accumulation steps"),
    "gradient_accumulation_steps": (1, int, "micro-batches per optimiser step"),
    "freeze_text_epochs": (5, int, "epochs with the pretrained text encoder frozen"),
    "text_encoder_warmup": ("restart", str, "once unfrozen, the text encoder's own linear warm-up (restart) or none (jump to the shared schedule)"),
    "ema_decay": (None, optional(float), "evaluate, keep and save an exponential moving average of the weights with this decay (e.g. 0.999), updated after every optimiser step; none = the trained weights (the paper)"),
    "calibrate_threshold": (True, boolean, "after training, choose the decision threshold on dev and save it in best/config.json"),
    "calibration_task": ("gmner", str, "the official-metric task whose dev F1 chooses the threshold (gmner, mner or eeg)"),
    "mixed_precision": (None, optional(str), "no, fp16 or bf16 (default: the accelerate launch setting)"),
    "seed": (42, int, "random seed (model init, shuffling, dropout)"),
    "group_by_length": (False, boolean, "batch tweets of similar lengths (shuffled mega-batches of 50 batches, each sorted by length): less padding"),
    # evaluation, logging, checkpoints
    "eval_batch_size": (32, int, "tweets per evaluation batch and process"),
    "output_dir": ("runs/mqspn", str, "where metrics, the best model and checkpoints go"),
    "feature_cache_dir": (None, optional(str), "region feature cache (default output_dir/region_features)"),
    "logging_steps": (10, int, "optimiser steps between training-loss lines in metrics.jsonl"),
    "checkpointing_steps": ("epoch", steps_or_epoch, "save_state every N optimiser steps, 'epoch', or none"),
    "save_total_limit": (2, optional(int), "keep the newest N checkpoints (transformers' convention; best/ is kept apart); none = all"),
    "resume_from_checkpoint": (None, optional(str), "a checkpoints/step_* folder, or 'latest'"),
    "stop_after_steps": (None, optional(int), "save state and stop after this many optimiser steps (resume later)"),
    "max_non_finite_steps": (10, int, "stop with an error once this many optimiser steps were skipped for a non-finite loss"),
    "report_to": ("none", str, "'tensorboard' to log through Accelerate's tracker, or 'none'"),
}


def parse_args(argv=None):
    """``--config recipe.json`` first, then every other option overrides the recipe."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    try:
        recipe = load_recipe(known.config) if known.config else {}
    except (OSError, ValueError) as error:
        raise UsageError(f"--config {known.config}: {error}") from None
    unknown = sorted(set(recipe) - set(OPTIONS))
    if unknown:
        near = closest(unknown[0], OPTIONS)
        raise UsageError(f"recipe {known.config}: unknown key(s) {unknown}; "
                         + (f"did you mean {near!r}?" if near else f"the keys are {sorted(OPTIONS)}"))

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a JSON recipe from configuration/")
    for key, (default, kind, help_text) in OPTIONS.items():
        # SUPPRESS: an option appears in the namespace only when given, so it overrides the recipe.
        parser.add_argument(f"--{key}", type=kind, default=argparse.SUPPRESS, help=f"{help_text} (default: {default})")
    given = vars(parser.parse_args(argv))
    config_path = given.pop("config", None)
    merged = merge_recipe({key: default for key, (default, _, _) in OPTIONS.items()}, recipe)
    return argparse.Namespace(config=config_path, **merge_recipe(merged, given))


# --------------------------------------------------------------------------------------------------
# Evaluation: every tweet exactly once, sharded across processes.


@torch.no_grad()
def predict(accelerator, model, processor, dataset, collator, batch_size):
    """Predictions ``[{"id", "entities": [{"start", "end", "type", "box", "text", "score", ...}]}]``
    for every row of ``dataset``, in dataset order. Each process predicts a contiguous shard
    (``split_between_processes``, uneven shards allowed, nothing padded or repeated) and
    ``gather_object`` concatenates the shards in process order."""
    model.eval()
    with accelerator.split_between_processes(list(range(len(dataset)))) as shard:
        part = dataset.select(shard)
        loader = DataLoader(part, batch_size=batch_size, shuffle=False, collate_fn=collator)
        rows = []
        ids = iter(part["id"])
        for batch in loader:
            batch = batch.to(accelerator.device)
            with accelerator.autocast():
                outputs = model(**select_model_inputs(batch, with_labels=False))
            entities = processor.post_process_grounded_ner(outputs, batch, config=model.config)
            rows.extend({"id": next(ids), "entities": tweet} for tweet in entities)
    predictions = gather_object(rows)
    got = [row["id"] for row in predictions]
    if len(got) != len(dataset) or len(set(got)) != len(got):
        raise RuntimeError(
            f"distributed prediction returned {len(got)} rows ({len(set(got))} distinct ids) for {len(dataset)} tweets"
        )
    return predictions


def references_of(dataset):
    """The evaluation references (ARCHITECTURE.md "Evaluation JSONL") of dataset rows."""
    return [{"id": row["id"], "entities": row["entities"]} for row in dataset]


def write_jsonl(rows, path):
    write_text_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))


def task_scores(results):
    return {task: {k: results[task][k] for k in ("precision", "recall", "f1")} for task in ("gmner", "mner", "eeg")}


# --------------------------------------------------------------------------------------------------
# Checkpoints: accelerator.save_state plus a small JSON of where the loop stood.


CHECKPOINT_NAME = re.compile(r"step_\d{8}")


def save_checkpoint_state(accelerator, output_dir, state, running=None, save_total_limit=None):
    """Write the state to ``checkpoints/step_N.partial``, then rename it to ``step_N`` once complete
    (``replace_folder``): a process killed while saving never leaves a ``step_N`` that loads wrongly.
    The state records the run's seconds so far and the length of ``metrics.jsonl`` (a resumed run
    continues both); then all but the newest ``save_total_limit`` checkpoints are deleted."""
    if running is not None:
        state["seconds"] = round(time.time() - running["started"], 1)
    state["metrics_bytes"] = metrics_size(os.path.join(output_dir, "metrics.jsonl"))
    folder = os.path.join(output_dir, "checkpoints", f"step_{state['completed_steps']:08d}")
    partial = folder + ".partial"
    if accelerator.is_main_process and os.path.isdir(partial):
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_text_atomically(os.path.join(partial, "trainer_state.json"), json.dumps(state, indent=2))
        replace_folder(partial, folder)
        prune_checkpoints(output_dir, save_total_limit)
    accelerator.wait_for_everyone()
    return folder


def recover_checkpoints(output_dir):
    """Clean up after a killed run (main process, before anything else): the best model and every
    checkpoint are put back or their half-written copies removed (``recover_folder``)."""
    recover_folder(os.path.join(output_dir, "best"))
    root = os.path.join(output_dir, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    for name in {name.split(".")[0] for name in names if not CHECKPOINT_NAME.fullmatch(name)}:
        recover_folder(os.path.join(root, name))


def find_checkpoint(output_dir, name):
    if name != "latest":
        if not os.path.isfile(os.path.join(name, "trainer_state.json")):
            raise SystemExit(f"--resume_from_checkpoint {name}: not a checkpoint folder (no trainer_state.json)")
        return name
    root = os.path.join(output_dir, "checkpoints")
    found = sorted(
        d for d in (os.listdir(root) if os.path.isdir(root) else [])
        if CHECKPOINT_NAME.fullmatch(d) and os.path.isfile(os.path.join(root, d, "trainer_state.json"))
    )
    if not found:
        raise SystemExit(f"--resume_from_checkpoint latest: no checkpoint in {root}")
    return os.path.join(root, found[-1])


def main(argv=None):
    """Parse the options, train (``train``), then take the data-parallel process group down.

    The order of the take-down matters. ``train`` returns (or raises) first, so the DDP wrapper and its
    gradient reducer are freed while Python still holds the process group; ``end_training`` then drops
    the last reference from Python, whose destructor releases the GIL. Freed the other way round (the
    reducer last, as when ``main``'s own locals go), the gloo process group is destroyed with the GIL
    held while a gloo worker thread can still be releasing the tensors of the last collective, which
    needs the GIL: both processes then wait for ever (seen as a hang after the test table in about one
    2-process CPU run in three)."""
    args = parse_args(argv)
    check_arguments(args)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with="tensorboard" if args.report_to == "tensorboard" else None,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    try:
        return train(accelerator, args)
    except BaseException as error:
        traceback.clear_frames(error.__traceback__)  # the traceback would keep the DDP wrapper alive
        raise
    finally:
        accelerator.free_memory()  # Accelerate's own references to the prepared model
        accelerator.end_training()


def per_device_batch_size(accelerator, args):
    micro = args.batch_size // (accelerator.num_processes * args.gradient_accumulation_steps)
    if micro < 1 or micro * accelerator.num_processes * args.gradient_accumulation_steps != args.batch_size:
        raise SystemExit(
            f"batch_size={args.batch_size} is not divisible by num_processes ({accelerator.num_processes}) x "
            f"gradient_accumulation_steps ({args.gradient_accumulation_steps}); choose a multiple"
        )
    return micro


class MetricsLog:
    """``metrics.jsonl`` (main process) and, with ``--report_to tensorboard``, Accelerate's tracker."""

    def __init__(self, accelerator, args):
        self.accelerator, self.args = accelerator, args
        self.path = os.path.join(args.output_dir, "metrics.jsonl")
        if accelerator.is_main_process and not args.resume_from_checkpoint and os.path.exists(self.path):
            print(f"a new run: replacing the metrics.jsonl of the earlier run in {args.output_dir}")
            os.remove(self.path)

    def __call__(self, record):
        if self.accelerator.is_main_process:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.args.report_to == "tensorboard":
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            for task, scores in record.get("scores", {}).items():
                scalars.update({f"{record['split']}/{task}_{k}": v for k, v in scores.items()})
            self.accelerator.log(scalars, step=record["step"])


def load_data(args, model_config):
    """The splits, read with the label space and k (``max_regions``) of the model that will be trained: the
    checkpoint's own config with ``--model_name_or_path``, else ``model_config`` over MQSPNConfig's defaults.
    Fills ``model_config``'s ``entity_types`` when the recipe leaves them open (the config then derives the
    PTQ words, ``default_type_verbalizers``)."""
    if args.model_name_or_path is not None:
        saved = MQSPNConfig.from_pretrained(args.model_name_or_path)
        if model_config:
            print(f"model_config {sorted(model_config)} is ignored: the checkpoint {args.model_name_or_path} fixes the model")
        max_regions, entity_types = saved.max_regions, saved.entity_types
    else:
        max_regions = model_config.get("max_regions", DEFAULT_MAX_REGIONS)
        entity_types = model_config.get("entity_types")
    try:  # a data error is one line naming the file and the fix (cli.run_cli), not a traceback
        splits = load_splits(
            args.dataset_format, args.data_dir, args.train_file, args.dev_file, args.test_file,
            args.xml_dir, args.images_dir, args.vinvl_dir, args.fmnerg_label_level, max_regions, entity_types,
        )
        if entity_types is None:
            entity_types = model_config["entity_types"] = entity_types_of(args.dataset_format, args.fmnerg_label_level, splits["train"])
        check_label_space(splits, entity_types)
        limit_samples(splits, args.max_train_samples, args.max_eval_samples)
        if args.model_name_or_path is None:
            resolve_type_query_counts(model_config, splits["train"]["entities"], entity_types)
    except (OSError, ValueError) as error:
        raise UsageError(str(error)) from None
    return splits


def train_one_epoch(accelerator, args, model, optimizer, scheduler, train_loader, text_parameters, state, epoch, log,
                    progress, running, average=None):
    """One pass over the training split (from ``state["batches_in_epoch"]`` on when resumed mid-epoch),
    updating the weight ``average`` (``--ema_decay``) after every optimiser step that was taken.
    Returns True when ``--stop_after_steps`` stopped the run (its state saved)."""
    model.train()
    train_loader.set_epoch(epoch)
    batches = iter(train_loader)
    if state["batches_in_epoch"]:
        # Resumed mid-epoch. The uninterrupted run drew the loader's base seed from the global
        # RNG when this epoch began, before the state was saved: the skipping loader must not
        # draw it again, or every later dropout mask would differ.
        rng = torch.get_rng_state()
        skipping = iter(accelerator.skip_first_batches(train_loader, state["batches_in_epoch"]))
        first = next(skipping, None)
        torch.set_rng_state(rng)
        batches = itertools.chain([] if first is None else [first], skipping)
    text_frozen = epoch < args.freeze_text_epochs
    non_finite = False  # a micro-batch of the current optimiser step had a non-finite loss
    for batch in batches:
        with accelerator.accumulate(model):
            outputs = model(**select_model_inputs(batch))
            finite = finite_on_every_process(accelerator, outputs.loss)
            non_finite = non_finite or not finite
            # A non-finite loss still runs backward (zeroed) so that data-parallel processes stay in
            # step; the whole optimiser step it belongs to is then skipped and its gradients dropped.
            accelerator.backward(outputs.loss if finite else outputs.loss.nan_to_num(0.0, 0.0, 0.0) * 0.0)
            if accelerator.sync_gradients and not non_finite:
                if text_frozen:
                    drop_gradients(text_parameters)
                if args.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            if not non_finite:
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                    if average is not None:
                        average.update_parameters(accelerator.unwrap_model(model))
            optimizer.zero_grad()
        state["batches_in_epoch"] += 1
        if finite:
            running["loss"] += outputs.loss.detach().float()
            running["count"] += 1
        if not accelerator.sync_gradients:
            continue
        state["completed_steps"] += 1
        progress.update(1)
        step = state["completed_steps"]
        if non_finite:
            non_finite = False
            state["non_finite_steps"] += 1
            log({"event": "non_finite_loss", "step": step, "epoch": epoch, "non_finite_steps": state["non_finite_steps"]})
            accelerator.print(f"step {step}: non-finite loss, optimiser step skipped "
                              f"({state['non_finite_steps']} of at most {args.max_non_finite_steps})")
            if state["non_finite_steps"] >= args.max_non_finite_steps:
                raise SystemExit(
                    f"stopping at step {step}: {state['non_finite_steps']} optimiser steps had a non-finite loss "
                    f"(--max_non_finite_steps {args.max_non_finite_steps}). Lower the learning rate or check the "
                    "data, then resume from the last checkpoint (--resume_from_checkpoint latest)"
                )
        if (step % args.logging_steps == 0 or step == progress.total) and running["count"]:
            loss = accelerator.reduce(running["loss"] / running["count"], "mean").item()
            log({"step": step, "epoch": epoch, "loss": loss, "lr": scheduler.get_last_lr()[-1],
                 "text_encoder_lr": scheduler.get_last_lr()[0], "seconds": round(time.time() - running["started"], 1)})
            progress.set_postfix(loss=f"{loss:.4f}")
            running["loss"], running["count"] = 0.0, 0
        if isinstance(args.checkpointing_steps, int) and step % args.checkpointing_steps == 0:
            save_checkpoint_state(accelerator, args.output_dir, state, running, args.save_total_limit)
        if args.stop_after_steps is not None and step >= args.stop_after_steps:
            if not (isinstance(args.checkpointing_steps, int) and step % args.checkpointing_steps == 0):
                save_checkpoint_state(accelerator, args.output_dir, state, running, args.save_total_limit)
            accelerator.print(f"stopped after {step} steps; resume with --resume_from_checkpoint latest")
            return True
    return False


def evaluate(accelerator, args, model, processor, dev, collator, state, epoch, log, extra):
    """Score ``dev`` with the official metric after ``epoch``; keep the model as ``best/`` when its GMNER F1 is
    the best so far (with its predictions and ``dev_results.json``)."""
    predictions = predict(accelerator, model, processor, dev, collator, args.eval_batch_size)
    results = evaluate_grounded_ner(predictions, references_of(dev))
    f1 = results["gmner"]["f1"]
    log({"step": state["completed_steps"], "epoch": epoch, "split": "dev", "scores": task_scores(results), **extra})
    accelerator.print(f"epoch {epoch}: dev GMNER F1 {100 * f1:.2f} (MNER {100 * results['mner']['f1']:.2f}, "
                      f"EEG {100 * results['eeg']['f1']:.2f})")
    if f1 > state["best_dev_gmner_f1"]:
        state["best_dev_gmner_f1"], state["best_epoch"] = f1, epoch
        if accelerator.is_main_process:
            best_dir = os.path.join(args.output_dir, "best")
            save_checkpoint(model, processor, best_dir + ".partial")
            replace_folder(best_dir + ".partial", best_dir)
            write_jsonl(predictions, os.path.join(args.output_dir, "dev_predictions.jsonl"))
            write_text_atomically(os.path.join(args.output_dir, "dev_results.json"),
                                  json.dumps({"epoch": epoch, **results}, indent=2))
        accelerator.wait_for_everyone()
    return results


def train(accelerator, args):
    """The whole run on this process: data, model, region features, optimiser, the epochs (each
    ``train_one_epoch`` then ``evaluate`` on dev), then the best model on test. Returns the trainer state."""
    micro = per_device_batch_size(accelerator, args)
    set_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    if accelerator.is_main_process:
        recover_checkpoints(args.output_dir)
    accelerator.wait_for_everyone()
    log = MetricsLog(accelerator, args)

    # ---- data, model and processor --------------------------------------------------------
    model_config = dict(args.model_config)
    splits = load_data(args, model_config)
    accelerator.print({split: len(dataset) for split, dataset in splits.items()})
    model, processor = build_model_and_processor(
        args.model_name_or_path, args.text_encoder, args.vision_encoder, args.tokenizer, model_config
    )
    model.to(accelerator.device)
    # The weight average (--ema_decay) is a copy made before ``prepare`` wraps the model; its first update copies
    # the trained weights again, so the copy's starting values never count.
    average = None if args.ema_decay is None else make_weight_average(model, args.ema_decay)
    log({"event": "query_capacity", "step": 0, "queries_per_type": model.config.queries_per_type,
         **check_query_capacity(splits, model.config)})
    log({"event": "uncovered_entities", "step": 0, "region_loss": model.config.uncovered_region_target,
         **count_uncovered(splits["train"], model.config.max_regions, processor.region_iou_threshold)})
    if accelerator.is_main_process:
        for split in splits:
            write_references_jsonl(splits[split], os.path.join(args.output_dir, f"{split}_references.jsonl"), include_proposals=True)
        report_proposal_coverage(splits, processor.max_regions, log, accelerator.print)  # the EEG / GMNER ceiling

    # ---- region features: the frozen tower runs once per (image, box), before the loop -------
    vision_calls = [0]
    model.vision_model.register_forward_hook(lambda *_: vision_calls.__setitem__(0, vision_calls[0] + 1))
    cache = RegionFeatureCache(args.feature_cache_dir or os.path.join(args.output_dir, "region_features"), model, processor)
    if accelerator.is_main_process:
        for split, dataset in splits.items():
            stats = cache.precompute(dataset)
            log({"event": "region_features", "split": split, "step": 0, **stats})
    accelerator.wait_for_everyone()

    def region_features(row):
        return cache.get(row["image"], row["proposals"][: processor.max_regions]).numpy()

    vision_size = model.config.vision_config.hidden_size
    train_collator = GroundedNERCollator(processor, region_features, vision_size, with_labels=True)
    eval_collator = GroundedNERCollator(processor, region_features, vision_size, with_labels=False)

    # ---- optimiser, schedule ---------------------------------------------------------------
    groups = parameter_groups(model, args.learning_rate, args.new_layers_learning_rate, args.weight_decay)
    text_parameters = [p for group in groups if group["role"] == "text_encoder" for p in group["params"]]
    optimizer = make_adamw(groups, args.adamw_implementation)
    sampler = train_sampler(splits["train"], args.batch_size, args.group_by_length, args.seed, processor.tokenizer)
    train_loader = DataLoader(splits["train"], batch_size=micro, shuffle=sampler is None, sampler=sampler, collate_fn=train_collator)
    model = set_text_encoder_frozen(accelerator, model, text_parameters, args.freeze_text_epochs > 0)  # DDP built frozen
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    total_steps = steps_per_epoch * args.num_epochs
    scheduler = make_schedule(optimizer.optimizer, total_steps, args.warmup_ratio, steps_per_epoch * args.freeze_text_epochs,
                              args.text_encoder_warmup)
    accelerator.register_for_checkpointing(scheduler)
    if average is not None:
        accelerator.register_for_checkpointing(average)  # the average and its update count, resumed with the rest
    if args.report_to == "tensorboard":
        accelerator.init_trackers("mqspn", config={k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in vars(args).items()})

    # ---- resume ----------------------------------------------------------------------------
    state = {"completed_steps": 0, "epoch": 0, "batches_in_epoch": 0, "best_dev_gmner_f1": -1.0, "best_epoch": None,
             "non_finite_steps": 0}
    resumed_from = None
    if args.resume_from_checkpoint:
        resumed_from = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
        accelerator.load_state(resumed_from)
        with open(os.path.join(resumed_from, "trainer_state.json"), encoding="utf-8") as handle:
            state = {"non_finite_steps": 0, **json.load(handle)}
        accelerator.print(f"resumed from {resumed_from}: epoch {state['epoch']}, batch {state['batches_in_epoch']}")
        if accelerator.is_main_process:
            rewind_metrics(log.path, state)  # the records written after the checkpoint come again

    log({"event": "start", "step": state["completed_steps"], "num_processes": accelerator.num_processes,
         "per_device_batch_size": micro, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
         "resumed_from": resumed_from})
    evaluated = accelerator.unwrap_model(model) if average is None else average.module  # dev scores and best/
    progress = tqdm(total=total_steps, initial=state["completed_steps"], disable=not accelerator.is_local_main_process, desc="train")
    running = {"loss": 0.0, "count": 0, "started": time.time() - state.get("seconds", 0.0)}

    # ---- the epochs ------------------------------------------------------------------------
    for epoch in range(state["epoch"], args.num_epochs):
        vision_calls[0] = 0
        model = set_text_encoder_frozen(accelerator, model, text_parameters, epoch < args.freeze_text_epochs)
        if train_one_epoch(accelerator, args, model, optimizer, scheduler, train_loader, text_parameters, state, epoch,
                           log, progress, running, average):
            return state
        extra = {"vision_tower_calls": vision_calls[0], "seconds": round(time.time() - running["started"], 1)}
        evaluate(accelerator, args, evaluated, processor, splits["dev"], eval_collator, state, epoch, log, extra)
        state["epoch"], state["batches_in_epoch"] = epoch + 1, 0
        if args.checkpointing_steps == "epoch":
            save_checkpoint_state(accelerator, args.output_dir, state, running, args.save_total_limit)
    progress.close()

    # ---- test evaluation with the best model -------------------------------------------------
    best_dir = os.path.join(args.output_dir, "best")
    if args.calibrate_threshold and accelerator.is_main_process:
        calibration = calibrate_best_checkpoint(args.output_dir, processor, splits["dev"], eval_collator, args.eval_batch_size,
                                                references_of(splits["dev"]), args.calibration_task, accelerator.device)
        log({"event": "threshold_calibration", "step": state["completed_steps"], **calibration})
        held_out = calibration["cross_fitted_f1"]
        accelerator.print(f"dev {args.calibration_task.upper()} F1 {100 * calibration['default_f1']:.2f} at "
                          f"{calibration['field']}={calibration['default']}, {100 * calibration['chosen_f1']:.2f} at the "
                          f"chosen {calibration['chosen']} (saved in best/config.json; chosen and scored on dev, so "
                          "optimistic" + ("" if held_out is None else f": {100 * held_out:.2f} when each half of dev is "
                                          "decoded at the threshold chosen on the other half") + ")")
    accelerator.wait_for_everyone()
    with open(os.path.join(args.output_dir, "dev_results.json"), encoding="utf-8") as handle:
        dev_results = json.load(handle)
    accelerator.print(f"best dev epoch {dev_results['epoch']}:\n{format_results_table(dev_results)}")
    if "test" in splits:
        best = MQSPNForGroundedNER.from_pretrained(best_dir).to(accelerator.device)
        predictions = predict(accelerator, best, processor, splits["test"], eval_collator, args.eval_batch_size)
        results = evaluate_grounded_ner(predictions, references_of(splits["test"]))
        log({"step": state["completed_steps"], "epoch": dev_results["epoch"], "split": "test", "scores": task_scores(results)})
        if accelerator.is_main_process:
            write_jsonl(predictions, os.path.join(args.output_dir, "test_predictions.jsonl"))
            write_text_atomically(os.path.join(args.output_dir, "test_results.json"), json.dumps(results, indent=2))
        accelerator.print(f"test (best dev model):\n{format_results_table(results)}")
    if accelerator.is_main_process:
        plot_metrics(log.path)
        accelerator.print(run_summary(args.output_dir, time.time() - running["started"]))
    return state


if __name__ == "__main__":
    sys.exit(run_cli(main))
