"""Training faults (docs/robustness.md, "Training faults") of ``examples/train.py``: evaluation on two processes
predicts every tweet exactly once for any dataset size."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1"}
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
from modeling_mqspn.training_utils import GroundedNERCollator
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
"""


@pytest.mark.slow
def test_two_process_evaluation_predicts_every_tweet_once_for_any_size(tmp_path):
    out = tmp_path / "ids.json"
    script = tmp_path / "sharded_evaluation.py"
    script.write_text(SHARDED_EVALUATION.format(root=str(ROOT), tests=str(ROOT / "tests"), examples=str(ROOT / "examples"),
                                                sizes=EVAL_SIZES, out=str(out)))
    command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", "--main_process_port", "29753", str(script)]
    done = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-5000:]
    seen = json.loads(out.read_text())
    for size in EVAL_SIZES:
        assert seen[str(size)] == [f"t{size}-{i}" for i in range(size)], size
