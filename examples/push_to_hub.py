"""Export an MQSPN checkpoint as a self-contained Hub repository and upload it.

    python examples/push_to_hub.py --model outputs/best --eval_results outputs/test_results.json \\
        --repo_id you/mqspn-twitter-gmner --dataset_name Twitter-GMNER --dataset_type twitter-gmner \\
        --dataset_split test [--dry_run DIR]

The folder holds everything a user with only `transformers` needs (`trust_remote_code=True`):

* `model.safetensors` and `config.json` with `auto_map` (AutoConfig, AutoModel) and `custom_pipelines`
  (the `grounded-ner` task), written by the pipeline's `save_pretrained`;
* the processor files (`processor_config.json` with its `auto_map`, tokenizer, image processor);
* the remote-code modules, exactly `modeling_mqspn.SHIPPED_MODULES` (`modeling_mqspn.tools.export`);
* `README.md`, generated from `MODEL_CARD.md`: Hub metadata (license, language, datasets, tags,
  metrics, and a `model-index` whose results are read from `--eval_results`, the JSON written by
  `examples/evaluate.py --output` or train.py's `test_results.json`), the checkpoint's configuration and the results tables;
* `handler.py` (`examples/handler.py`, the Inference Endpoints `EndpointHandler`) and its
  `requirements.txt`.

`--dry_run DIR` writes that folder to DIR and uploads nothing. Without it the folder is written to a
temporary directory and uploaded with `huggingface_hub.upload_folder` (log in first with
`hf auth login`, or set `HF_TOKEN`).
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_CARD = REPO_ROOT / "MODEL_CARD.md"
HANDLER = Path(__file__).resolve().parent / "handler.py"

TASKS = ("gmner", "mner", "eeg")
TASK_TITLES = {"gmner": "GMNER", "mner": "MNER", "eeg": "EEG"}
METRICS = ("precision", "recall", "f1")
# The Inference Endpoints container brings torch; the rest is what the remote-code modules import,
# plus OpenCV contrib for the selective-search proposer used when a request gives no boxes.
ENDPOINT_REQUIREMENTS = [
    "transformers>=5.17,<6",
    "safetensors>=0.4",
    "scipy>=1.10",
    "numpy>=1.24",
    "pillow>=10.1",
    "opencv-contrib-python-headless>=4.8",
]


def load_eval_results(path: str) -> Dict[str, Dict]:
    """The evaluation JSON of `examples/evaluate.py`: keys gmner / mner / eeg, each with precision,
    recall, f1 as fractions in [0, 1]. Raises ValueError naming the file and the key at fault."""
    try:
        with open(path, encoding="utf-8") as handle:
            results = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg}, line {error.lineno}); give the file that "
                         "examples/evaluate.py --output wrote") from None
    if not isinstance(results, dict):
        raise ValueError(f"{path}: expected a JSON object with keys {list(TASKS)}")
    for task in TASKS:
        if not isinstance(results.get(task), dict):
            raise ValueError(f"{path}: missing key '{task}'; give the file that examples/evaluate.py --output wrote")
        for metric in METRICS:
            value = results[task].get(metric)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
                raise ValueError(f"{path}: '{task}.{metric}' must be a fraction in [0, 1], got {value!r}")
    return results


def split_front_matter(text: str, path: Path):
    """`(metadata dict, body)` of a Markdown file with a YAML front matter block."""
    import yaml

    if not text.startswith("---\n"):
        raise ValueError(f"{path}: the model card template must start with a '---' YAML metadata block")
    end = text.find("\n---\n", 4)
    if end < 0:
        raise ValueError(f"{path}: the YAML metadata block is not closed by a '---' line")
    return yaml.safe_load(text[4:end]) or {}, text[end + 5 :]


def layers(count: int) -> str:
    return f"{count} layer{'' if count == 1 else 's'}"


def results_author(source: str) -> str:
    """Which script wrote the evaluation JSON, when the file says so by where it is: ``dev_results.json`` /
    ``test_results.json`` in a folder with ``metrics.jsonl`` come from ``examples/train.py`` (the best dev
    checkpoint); otherwise nothing is claimed."""
    path = Path(source)
    if path.name in ("dev_results.json", "test_results.json") and (path.parent / "metrics.jsonl").is_file():
        return ", written by `examples/train.py` (the best dev checkpoint, scored with the official metric)"
    return ""


def configuration_table(config) -> str:
    """The checkpoint's MQSPN configuration as a Markdown table (read from its config)."""
    text, vision = config.text_config, config.vision_config
    rows = [
        ("entity types (p)", ", ".join(config.entity_types)),
        ("entity queries (u)", config.num_queries),
        ("candidate regions per image (k)", config.max_regions),
        ("QFNet layers (L)", config.num_fusion_layers),
        ("text encoder", f"BERT, {layers(text.num_hidden_layers)}, hidden size {text.hidden_size}"),
        ("vision tower (frozen)", f"CLIP ViT, {layers(vision.num_hidden_layers)}, hidden size {vision.hidden_size}, "
                                  f"patch {vision.patch_size}, {vision.image_size} px"
         if config.include_vision_tower else "not included: the model takes precomputed region features"),
        ("classification head", config.head_mode),
        ("existence threshold", config.existence_threshold),
        ("longest span (words)", config.max_span_words),
    ]
    lines = ["| setting | value |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def results_section(results: Dict, source: str, dataset_name: str, dataset_split: str) -> str:
    """Markdown tables of the evaluation JSON (percentages), with the file's SHA-256 for provenance."""
    digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    lines = [
        f"On {dataset_name} ({dataset_split} split); numbers from `{Path(source).name}` "
        f"(sha256 `{digest[:16]}…`){results_author(source)}.",
        "",
        "| task | precision | recall | F1 |",
        "|---|---|---|---|",
    ]
    for task in TASKS:
        row = results[task]
        lines.append(f"| {TASK_TITLES[task]} | " + " | ".join(f"{100 * row[m]:.2f}" for m in METRICS) + " |")
    per_type = results["gmner"].get("per_type") or {}
    if per_type:
        lines += ["", "GMNER per entity type:", "", "| type | precision | recall | F1 |", "|---|---|---|---|"]
        for name in sorted(per_type):
            row = per_type[name]
            lines.append(f"| {name} | " + " | ".join(f"{100 * row[m]:.2f}" for m in METRICS) + " |")
    return "\n".join(lines)


def model_card(config, results, eval_path, repo_id, dataset_name, dataset_type, dataset_split) -> str:
    """README.md: MODEL_CARD.md's metadata + datasets + model-index from the results, and its body with
    the configuration and results blocks filled in."""
    from huggingface_hub import EvalResult, ModelCardData

    metadata, body = split_front_matter(MODEL_CARD.read_text(encoding="utf-8"), MODEL_CARD)
    for marker in ("<!-- configuration -->", "<!-- results -->"):
        if marker not in body:
            raise ValueError(f"{MODEL_CARD}: the template lost its '{marker}' line")
    body = body[body.index("-->") + 3 :].lstrip("\n") if body.lstrip().startswith("<!--") else body
    eval_results = [
        EvalResult(
            task_type="token-classification",
            task_name="Grounded Multimodal Named Entity Recognition",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split=dataset_split,
            metric_type=metric,
            metric_name=f"{TASK_TITLES[task]} {metric}",
            metric_value=round(100 * float(results[task][metric]), 2),
        )
        for task in TASKS
        for metric in METRICS
    ]
    card_data = ModelCardData(
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results,
        datasets=[dataset_type],
        **metadata,
    )
    body = body.replace("{repo_id}", repo_id).replace("{dataset_name}", dataset_name).replace("{dataset_split}", dataset_split)
    body = body.replace("<!-- configuration -->", configuration_table(config))
    body = body.replace("<!-- results -->", results_section(results, eval_path, dataset_name, dataset_split))
    return f"---\n{card_data.to_yaml()}\n---\n\n{body}"


def export(model_dir: str, out_dir: str, eval_path: str, repo_id: str, dataset_name: str, dataset_type: str,
           dataset_split: str) -> List[str]:
    """Write the Hub folder of the checkpoint in `model_dir` to `out_dir` (new or empty); returns the
    sorted file names."""
    from modeling_mqspn import MQSPNForGroundedNER, MQSPNProcessor
    from modeling_mqspn.tools.export import save_checkpoint

    results = load_eval_results(eval_path)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: the export folder must be new or empty (it would mix with old files)")
    out.mkdir(parents=True, exist_ok=True)
    if not (Path(model_dir) / "processor_config.json").is_file():
        raise ValueError(f"{model_dir}: no processor_config.json; save the MQSPNProcessor with the checkpoint "
                         "(processor.save_pretrained(folder))")

    model = MQSPNForGroundedNER.from_pretrained(model_dir).eval()
    processor = MQSPNProcessor.from_pretrained(model_dir)
    # model.safetensors, config.json (auto_map, custom_pipelines), the processor, modeling_mqspn.SHIPPED_MODULES
    save_checkpoint(model, processor, out, extra_files=["handler.py"])
    shutil.copyfile(HANDLER, out / "handler.py")
    (out / "requirements.txt").write_text("\n".join(ENDPOINT_REQUIREMENTS) + "\n", encoding="utf-8")
    card = model_card(model.config, results, eval_path, repo_id, dataset_name, dataset_type, dataset_split)
    (out / "README.md").write_text(card, encoding="utf-8")

    pickled = [path.name for path in out.iterdir() if path.suffix in (".bin", ".pt", ".pth", ".pkl")]
    if pickled or not (out / "model.safetensors").is_file():
        raise RuntimeError(f"{out}: expected model.safetensors and no pickle files, found {sorted(os.listdir(out))}")
    return sorted(os.listdir(out))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder (model + processor saved together)")
    parser.add_argument("--eval_results", "--eval-results", required=True, help="evaluation JSON: what examples/evaluate.py --output writes, or train.py's dev_results.json / test_results.json")
    parser.add_argument("--repo_id", "--repo-id", required=True, help="Hub repository, e.g. you/mqspn-twitter-gmner")
    parser.add_argument("--dataset_name", "--dataset-name", required=True, help="pretty name of the evaluation dataset, e.g. Twitter-GMNER")
    parser.add_argument("--dataset_type", "--dataset-type", required=True, help="dataset id for the metadata, e.g. twitter-gmner")
    parser.add_argument("--dataset_split", "--dataset-split", default="test", help="the split evaluated (default: test)")
    parser.add_argument("--dry_run", "--dry-run", metavar="DIR", help="write the repository folder to DIR and upload nothing")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--commit_message", "--commit-message", default="Upload MQSPN checkpoint")
    args = parser.parse_args(argv)

    from modeling_mqspn.tools.cli import UsageError, check_model_path, is_repo_id

    try:
        check_model_path(args.model)
        if not os.path.isdir(args.model):
            raise UsageError(f"--model {args.model}: the folder does not exist; give the checkpoint folder (e.g. runs/demo/best)")
        if not is_repo_id(args.repo_id) or "/" not in args.repo_id:
            raise UsageError(f"--repo_id {args.repo_id!r} is not a Hub repo id; write namespace/name "
                             "(letters, digits, '-', '_', '.'), e.g. you/mqspn-demo")
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    dataset = (args.dataset_name, args.dataset_type, args.dataset_split)
    try:
        if args.dry_run:
            files = export(args.model, args.dry_run, args.eval_results, args.repo_id, *dataset)
            print(f"wrote {len(files)} files to {args.dry_run} (dry run, nothing uploaded): {', '.join(files)}")
            return 0
        from huggingface_hub import HfApi

        with tempfile.TemporaryDirectory() as folder:
            files = export(args.model, folder, args.eval_results, args.repo_id, *dataset)
            api = HfApi()
            api.create_repo(args.repo_id, private=args.private, exist_ok=True)
            commit = api.upload_folder(repo_id=args.repo_id, folder_path=folder, commit_message=args.commit_message)
        print(f"uploaded {len(files)} files to {args.repo_id}: {commit}")
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
