"""Training faults (docs/robustness.md, "Training faults") of ``examples/train.py``: a non-finite loss skips its
optimiser step and is counted, too many stop the run with a clear message; checkpoints and the best model are
written so that a killed process never leaves one that loads wrongly; `kill -9` then resume completes the run
with the weights of an uninterrupted one; evaluation on two processes predicts every tweet exactly once for any
dataset size."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import free_port, load_script, run_process
from test_train import ACCELERATE, ENV, ROOT, TRAIN, demo, read_jsonl, run, train_command  # noqa: F401  (demo is a fixture)

EVAL_SIZES = [0, 1, 2, 3, 4, 5, 7, 11]

# Run under `accelerate launch --num_processes 2`: train.py's `predict` on dev sets of every size in
# EVAL_SIZES, with eval batches of 2; the main process writes the predicted ids per size.
SHARDED_EVALUATION = """
import json, sys
sys.path[:0] = [{root!r}, {tests!r}, {examples!r}]
import numpy as np, torch
from accelerate import Accelerator
from datasets import Dataset
from conftest import tiny_config
from modeling_mqspn import MQSPNForGroundedNER
from modeling_mqspn.tools.training import GroundedNERCollator
from test_robustness_images import tiny_processor
import train

accelerator = Accelerator()
torch.manual_seed(0)
model = MQSPNForGroundedNER(tiny_config()).eval().to(accelerator.device)
processor = tiny_processor(max_regions=4)
width = model.config.vision_config.hidden_size
collator = GroundedNERCollator(processor, lambda row: np.ones((len(row["proposals"][:4]), width), np.float32), width,
                               with_labels=False)
seen = {{}}
for size in {sizes!r}:
    rows = [{{"id": f"t{{size}}-{{i}}", "words": ["abc"] * (1 + i % 3), "entities": [], "image": None,
              "image_size": None, "proposals": [[0.0, 0.0, 5.0, 5.0]] * (i % 2)}} for i in range(size)]
    dataset = Dataset.from_list(rows) if rows else Dataset.from_dict(
        {{"id": [], "words": [], "entities": [], "image": [], "image_size": [], "proposals": []}})
    predictions = train.predict(accelerator, model, processor, dataset, collator, batch_size=2)
    seen[size] = [row["id"] for row in predictions]
if accelerator.is_main_process:
    with open({out!r}, "w") as handle:
        json.dump(seen, handle)
accelerator.end_training()
"""


@pytest.mark.slow
def test_two_process_evaluation_predicts_every_tweet_once_for_any_size(tmp_path):
    out = tmp_path / "ids.json"
    script = tmp_path / "sharded_evaluation.py"
    script.write_text(SHARDED_EVALUATION.format(root=str(ROOT), tests=str(ROOT / "tests"), examples=str(ROOT / "examples"),
                                                sizes=EVAL_SIZES, out=str(out)))
    command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(script)]
    done = run_process(command, cwd=tmp_path, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-5000:]
    seen = json.loads(out.read_text())
    for size in EVAL_SIZES:
        assert seen[str(size)] == [f"t{size}-{i}" for i in range(size)], size


# ------------------------------------------------------------------------------------------------
# Crash-safe folders and checkpoints
# ------------------------------------------------------------------------------------------------


def test_replace_folder_and_recover_folder_never_leave_a_half_written_folder(tmp_path):
    from modeling_mqspn.tools.training import recover_folder, replace_folder

    final = tmp_path / "best"
    final.mkdir()
    (final / "model.safetensors").write_text("old")
    new = tmp_path / "best.partial"
    new.mkdir()
    (new / "model.safetensors").write_text("new")
    replace_folder(str(new), str(final))
    assert (final / "model.safetensors").read_text() == "new" and not new.exists()
    assert not (tmp_path / "best.old").exists()
    # Killed between the two renames: only best.old is left; recovery puts it back.
    os.replace(final, tmp_path / "best.old")
    recover_folder(str(final))
    assert (final / "model.safetensors").read_text() == "new" and not (tmp_path / "best.old").exists()
    # Killed while writing the new folder: the half-written best.partial is removed, best is untouched.
    (tmp_path / "best.partial").mkdir()
    (tmp_path / "best.partial" / "model.safetensors").write_text("ha")
    recover_folder(str(final))
    assert not (tmp_path / "best.partial").exists() and (final / "model.safetensors").read_text() == "new"


class FailingAccelerator:
    """Stands in for `Accelerator` in `save_checkpoint_state`: `save_state` writes one file, then dies."""

    is_main_process = True

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        os.makedirs(folder, exist_ok=True)
        Path(folder, "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt("killed while saving")


def load_train_script():
    return load_script("examples/train.py", "train_script")


def test_a_checkpoint_killed_while_saving_is_never_picked_for_resuming(tmp_path):
    train = load_train_script()
    root = tmp_path / "checkpoints"
    good = root / "step_00000003"
    good.mkdir(parents=True)
    (good / "trainer_state.json").write_text(json.dumps({"completed_steps": 3}))
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint_state(FailingAccelerator(), str(tmp_path), {"completed_steps": 4})
    assert not (root / "step_00000004").exists()  # only the .partial folder holds the broken save
    assert train.find_checkpoint(str(tmp_path), "latest") == str(good)
    train.recover_checkpoints(str(tmp_path))
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]


# ------------------------------------------------------------------------------------------------
# Runs of examples/train.py (single process, plain python: what `accelerate launch` adds is not needed)
# ------------------------------------------------------------------------------------------------

# Runs train.py with the model's training forward returning a NaN loss on the calls listed in
# $NAN_CALLS (1-based, training calls only): a fault injected from outside the script.
NAN_WRAPPER = """
import os, sys
sys.path[:0] = [{root!r}, {examples!r}]
import torch
from modeling_mqspn import MQSPNForGroundedNER
import train

bad = {{int(call) for call in os.environ["NAN_CALLS"].split(",")}}
original = MQSPNForGroundedNER.forward
calls = [0]

def forward(self, *args, **kwargs):
    outputs = original(self, *args, **kwargs)
    if self.training:
        calls[0] += 1
        if calls[0] in bad:
            outputs.loss = outputs.loss * float("nan")
    return outputs

MQSPNForGroundedNER.forward = forward
train.main(sys.argv[1:])
"""


def python_command(demo, output_dir, *extra, script=None):
    """train_command's arguments, run by plain python (optionally through a wrapper script)."""
    command = train_command(demo, output_dir, *extra)
    arguments = command[command.index(TRAIN) + 1:]
    return [sys.executable, str(script) if script else TRAIN, *arguments]


def nan_wrapper(tmp_path):
    path = tmp_path / "nan_train.py"
    path.write_text(NAN_WRAPPER.format(root=str(ROOT), examples=str(ROOT / "examples")))
    return path


@pytest.mark.slow
def test_a_non_finite_loss_skips_its_step_is_counted_and_too_many_stop_the_run(demo, tmp_path):
    from safetensors.torch import load_file

    wrapper = nan_wrapper(tmp_path)
    out = tmp_path / "skip"
    # 3 steps per epoch; the second step's loss is NaN.
    run(python_command(demo, out, "--num_epochs", "2", "--checkpointing_steps", "1", "--save_total_limit", "none",
                       script=wrapper), NAN_CALLS="2")  # every checkpoint kept: the test reads steps 1 to 3
    records = read_jsonl(out / "metrics.jsonl")
    skipped = [r for r in records if r.get("event") == "non_finite_loss"]
    assert [(r["step"], r["non_finite_steps"]) for r in skipped] == [(2, 1)]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}  # logged every step; step 2 had no finite loss
    assert sorted(losses) == [1, 3, 4, 5, 6] and all(math.isfinite(loss) for loss in losses.values())
    states = {c.name: json.loads((c / "trainer_state.json").read_text()) for c in (out / "checkpoints").iterdir()}
    assert states["step_00000006"]["non_finite_steps"] == 1 and (out / "test_results.json").exists()
    # The skipped step changed no weight; the steps around it did.
    weights = {step: load_file(out / "checkpoints" / f"step_0000000{step}" / "model.safetensors") for step in (1, 2, 3)}
    assert all(torch.equal(weights[1][name], weights[2][name]) for name in weights[1])
    assert any(not torch.equal(weights[2][name], weights[3][name]) for name in weights[2])

    stopped = tmp_path / "stop"
    done = run(python_command(demo, stopped, "--num_epochs", "2", "--max_non_finite_steps", "2", script=wrapper),
                        check=False, NAN_CALLS="1,3,4")
    assert done.returncode != 0
    assert "2 optimiser steps had a non-finite loss (--max_non_finite_steps 2)" in done.stderr + done.stdout
    assert not (stopped / "test_results.json").exists()


@pytest.mark.slow
def test_kill_9_during_training_then_resume_completes_the_run(demo, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "killed"
    command = python_command(demo, out, "--num_epochs", "3", "--checkpointing_steps", "1")
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step_00000004").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "test_results.json").exists()
    resumed = run(python_command(demo, out, "--num_epochs", "3", "--checkpointing_steps", "1",
                                          "--resume_from_checkpoint", "latest"))
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert json.loads((out / "test_results.json").read_text())["gmner"]
    final = json.loads((out / "checkpoints" / "step_00000009" / "trainer_state.json").read_text())
    assert final["completed_steps"] == 9 and final["batches_in_epoch"] == 3  # the last step of epoch 2
    for checkpoint in (out / "checkpoints").iterdir():  # every checkpoint left behind is whole
        assert checkpoint.name.startswith("step_") and checkpoint.name[5:].isdigit()
        load_file(checkpoint / "model.safetensors")
    # The resumed run ends where an uninterrupted one does.
    whole = tmp_path / "whole"
    run(python_command(demo, whole, "--num_epochs", "3", "--checkpointing_steps", "epoch"))
    ours = load_file(out / "checkpoints" / "step_00000009" / "model.safetensors")
    theirs = load_file(whole / "checkpoints" / "step_00000009" / "model.safetensors")
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=name)
