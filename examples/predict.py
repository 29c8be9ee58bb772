"""Grounded NER on new tweets and photos: predictions JSONL + one PNG per image with the boxes drawn.

    # one tweet and its photo
    python examples/predict.py --model outputs/best --image photo.jpg --text "Messi lands in Paris" \\
        --output_dir predictions/
    # many: a JSONL file, one object per line
    python examples/predict.py --model outputs/best --input tweets.jsonl --output_dir predictions/

A JSONL line is `{"id": ..., "text": "..." or "words": [...], "image": "path", "boxes": [[x1, y1, x2,
y2], ...]}`; only the text (or words) is required. Image paths are relative to the JSONL file's folder.
`id` defaults to the line number; `image` may be an http(s) URL. The dataset JSONL that
`examples/train.py` reads (docs/DATA.md) works as it is: its `proposals` are the boxes, its `entities`
and `image_size` are ignored. Without `boxes`, `--proposer` finds the candidate regions (default:
OpenCV selective search; `detector` with `--detector NAME`; `vinvl` with `--vinvl_dir DIR`).

A line that cannot be predicted (a missing or corrupt image, boxes without an image, a missing VinVL
file, bad JSON) does not stop the others: it gets a row `{"id", "error"}`, is listed on stderr and
counted in the summary; the exit code is 0 unless `--strict` (then 1 when any line failed).

Writes `OUTPUT_DIR/predictions.jsonl` — per input `{"id", "text" | "words", "image", "entities": [...]}`
with the entity dicts of the `grounded-ner` pipeline (word spans, type, box or null, scores), or
`"error"` instead of `"entities"`, which `examples/evaluate.py --predictions` reads (an error row
scores as no prediction, counted) — and `OUTPUT_DIR/images/<id>.png`: the photo with each
grounded entity's box, text and type drawn, and the entities not in the photo listed below it.
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Dict, List

DTYPES = ("float32", "bfloat16", "float16")
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def png_name(sample_id: str) -> str:
    """The file name of a sample's picture: its id with characters other than letters, digits, '.',
    '_' and '-' replaced by '_'."""
    return SAFE_NAME.sub("_", sample_id) + ".png"


INPUT_KEYS = ("id", "text", "words", "image", "boxes")
# The dataset JSONL that train.py reads (docs/DATA.md) is an input too: its "proposals" are the
# candidate boxes, its gold "entities" and "image_size" are not needed to predict and are ignored.
DATASET_KEYS = ("entities", "proposals", "image_size")


def is_url(image: str) -> bool:
    return isinstance(image, str) and image.startswith(("http://", "https://"))


def read_inputs(path: str) -> List[Dict]:
    """The JSONL inputs, one per non-empty line, in file order. A line that cannot be predicted (not
    JSON, unknown keys, a missing image, an id already used) becomes ``{"id", "line", "error"}`` so that
    the other lines still run; image paths are made relative to the file's folder (URLs are kept as
    given). Only an unreadable or empty file raises ``ValueError``."""
    from modeling_mqspn.tools.file_utils import parse_json_line, utf8_lines

    base = Path(path).resolve().parent
    inputs, seen = [], {}
    for number, line in utf8_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        row = None
        try:
            row = parse_json_line(line, where)
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, found {type(row).__name__}")
            unknown = sorted(set(row) - set(INPUT_KEYS) - set(DATASET_KEYS))
            if unknown:
                raise ValueError(f"{where}: unknown keys {unknown}; a line has id, text or words, image, boxes "
                                 "(or the dataset JSONL's proposals, entities, image_size)")
            row["id"] = str(row.get("id", number))
            if "proposals" in row:
                if "boxes" in row:
                    raise ValueError(f"{where}: give 'boxes' or 'proposals', not both")
                row["boxes"] = row.pop("proposals")
            for key in ("entities", "image_size"):
                row.pop(key, None)
            if ("text" in row) == ("words" in row):
                raise ValueError(f"{where}: give exactly one of 'text' (a string) or 'words' (a list of words)")
            name = png_name(row["id"])
            if name in seen:
                raise ValueError(f"{where}: id {row['id']!r} gives the PNG name {name} of line {seen[name]}; ids must differ")
            seen[name] = number
            if row.get("image") is not None and not is_url(row["image"]):
                image = Path(row["image"])
                row["image"] = str(image if image.is_absolute() else base / image)
                if not Path(row["image"]).is_file():
                    raise ValueError(f"{where}: image {row['image']} does not exist")
        except ValueError as error:
            row = {"id": str(row.get("id", number)) if isinstance(row, dict) else str(number), "line": number,
                   "error": str(error)}
        inputs.append(row)
    if not inputs:
        raise ValueError(f"{path}: no input lines")
    return inputs


def build_pipeline(args):
    """The grounded-ner pipeline on the checkpoint (package classes: any saved checkpoint works)."""
    from transformers import pipeline

    from modeling_mqspn import MQSPNForGroundedNER
    from modeling_mqspn.pipeline_mqspn import TASK
    from modeling_mqspn.processing_mqspn import MQSPNProcessor

    import torch

    model = MQSPNForGroundedNER.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    processor = MQSPNProcessor.from_pretrained(args.model)
    options = {}
    if args.proposer == "detector":
        if not args.detector:
            raise ValueError("--proposer detector needs --detector (a transformers object detector folder or Hub name)")
        options = {"proposer": "detector", "proposer_kwargs": {"model": args.detector, "device": args.device}}
    elif args.proposer == "vinvl":
        if not args.vinvl_dir:
            raise ValueError("--proposer vinvl needs --vinvl_dir (the folder of <IMGID>.jpg.npz files)")
        options = {"proposer": "vinvl", "proposer_kwargs": {"directory": args.vinvl_dir}}
    elif args.proposer == "selective-search":
        options = {"proposer": "selective-search"}
    if args.threshold is not None:
        options["threshold"] = args.threshold
    return pipeline(TASK, model=model, processor=processor, device=args.device, **options)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub id (model + processor)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="JSONL file of inputs (see the module docstring)")
    source.add_argument("--text", help="one tweet (with --image)")
    parser.add_argument("--image", help="the tweet's image, a file or an http(s) URL (with --text)")
    parser.add_argument("--boxes", help="candidate boxes for --image as JSON: [[x1, y1, x2, y2], ...]")
    parser.add_argument("--output_dir", "--output-dir", required=True, help="folder for predictions.jsonl and images/")
    parser.add_argument("--proposer", choices=["auto", "selective-search", "detector", "vinvl"], default="auto",
                        help="regions for images without boxes (auto: selective search when OpenCV contrib is installed)")
    parser.add_argument("--detector", help="object detector for --proposer detector")
    parser.add_argument("--vinvl_dir", "--vinvl-dir", help="VinVL .npz folder for --proposer vinvl")
    parser.add_argument("--threshold", type=float, help="existence threshold (default: the model's)")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="weights and activations: float32 (default, what training validated), bfloat16 (the usual "
                             "choice on a GPU; 2-3x faster at batch 1 on a CPU with AMX, bench/RESULTS.md §4c; measure first on a "
                             "CPU without bf16 instructions) or float16 (GPU only)")
    parser.add_argument("--strict", action="store_true",
                        help="exit with code 1 when any input failed (default: 0; failed inputs are rows with \"error\")")
    return parser.parse_args(argv)


def single_input(args) -> Dict:
    """The ``--text`` / ``--image`` / ``--boxes`` input."""
    row = {"id": Path(args.image).stem if args.image and not is_url(args.image) else "text", "text": args.text}
    if args.image:
        if not is_url(args.image) and not os.path.isfile(args.image):
            raise ValueError(f"--image {args.image} does not exist")
        row["image"] = args.image
    if args.boxes:
        try:
            row["boxes"] = json.loads(args.boxes)
        except json.JSONDecodeError as error:
            raise ValueError(f"--boxes is not valid JSON ({error.msg}); write [[x1, y1, x2, y2], ...]") from None
    return row


def main(argv=None) -> int:
    """Predict every input that can be predicted; one row per input in ``predictions.jsonl`` (a failed one
    with its ``"error"``). Exit code 0, or 1 with ``--strict`` when an input failed; 2 for a bad argument
    (nothing predicted)."""
    from modeling_mqspn.tools.cli import check_device, check_model_path, check_output_dir

    args = parse_args(argv)
    try:
        check_output_dir(args.output_dir)
        check_device(args.device)
        if args.dtype == "float16" and args.device == "cpu":
            raise ValueError("--dtype float16 needs a GPU (--device cuda); on the CPU use bfloat16 or float32")
        check_model_path(args.model)
        if args.input:
            if args.image or args.boxes:
                raise ValueError("--image / --boxes go with --text; in --input files they are per line")
            inputs = read_inputs(args.input)
        else:
            inputs = [single_input(args)]
        ner = build_pipeline(args)
    except (OSError, ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    good = [row for row in inputs if "error" not in row]
    if good:
        results = ner([{key: row[key] for key in INPUT_KEYS if key in row} for row in good], batch_size=args.batch_size)
        for row, result in zip(good, results):
            if isinstance(result, dict) and "error" in result:
                row["error"] = result["error"]
            else:
                row["entities"] = result

    from modeling_mqspn.proposers_mqspn import load_rgb_image
    from modeling_mqspn.visualize import draw_entities

    out = Path(args.output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    drawn, failed = 0, []
    lines = []
    for row in inputs:
        record = {key: row[key] for key in ("id", "text", "words", "image") if key in row}
        if "error" in row:
            record["error"] = row["error"]
            failed.append(row)
        else:
            record["entities"] = row["entities"]
            if row.get("image") is not None:
                try:
                    draw_entities(load_rgb_image(row["image"]), row["entities"]).save(out / "images" / png_name(row["id"]))
                    drawn += 1
                except (OSError, ValueError) as error:
                    print(f"warning: id {row['id']!r}: no PNG ({error})", file=sys.stderr)
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(lines)
    predicted = [row["entities"] for row in inputs if "entities" in row]
    grounded = sum(entity["box"] is not None for entities in predicted for entity in entities)
    total = sum(len(entities) for entities in predicted)
    for row in failed:
        print(f"failed: id {row['id']!r}: {' '.join(str(row['error']).split())}", file=sys.stderr)
    print(f"{len(inputs)} input(s), {len(failed)} failed: {total} entities, {grounded} grounded; wrote "
          f"{out / 'predictions.jsonl'} (one row per input, failed ones with \"error\") and {drawn} PNG(s) in "
          f"{out / 'images'}")
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
