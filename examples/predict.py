"""Grounded NER on new tweets and photos: predictions JSONL + one PNG per image with the boxes drawn.

    # one tweet and its photo
    python examples/predict.py --model outputs/best --image photo.jpg --text "Messi lands in Paris" \\
        --output-dir predictions/
    # many: a JSONL file, one object per line
    python examples/predict.py --model outputs/best --input tweets.jsonl --output-dir predictions/

A JSONL line is `{"id": ..., "text": "..." or "words": [...], "image": "path", "boxes": [[x1, y1, x2,
y2], ...]}`; only the text (or words) is required. Image paths are relative to the JSONL file's folder.
`id` defaults to the line number. Without `boxes`, `--proposer` finds the candidate regions
(default: OpenCV selective search; `detector` with `--detector NAME`; `vinvl` with `--vinvl-dir DIR`).

Writes `OUTPUT_DIR/predictions.jsonl` — per input `{"id", "text" | "words", "image", "entities": [...]}`
with the entity dicts of the `grounded-ner` pipeline (word spans, type, box or null, scores), which
`examples/evaluate.py --predictions` reads — and `OUTPUT_DIR/images/<id>.png`: the photo with each
grounded entity's box, text and type drawn, and the entities not in the photo listed below it.
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Dict, List

SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def png_name(sample_id: str) -> str:
    """The file name of a sample's picture: its id with characters other than letters, digits, '.',
    '_' and '-' replaced by '_'."""
    return SAFE_NAME.sub("_", sample_id) + ".png"


def read_inputs(path: str) -> List[Dict]:
    """The JSONL inputs, validated; image paths made relative to the file's folder. Errors name the
    file and line."""
    base = Path(path).resolve().parent
    inputs, seen = [], {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg}); each line holds one object") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, found {type(row).__name__}")
            unknown = sorted(set(row) - {"id", "text", "words", "image", "boxes"})
            if unknown:
                raise ValueError(f"{where}: unknown keys {unknown}; a line has id, text or words, image, boxes")
            if ("text" in row) == ("words" in row):
                raise ValueError(f"{where}: give exactly one of 'text' (a string) or 'words' (a list of words)")
            row["id"] = str(row.get("id", number))
            name = png_name(row["id"])
            if name in seen:
                raise ValueError(f"{where}: id {row['id']!r} gives the PNG name {name} of line {seen[name]}; ids must differ")
            seen[name] = number
            if row.get("image") is not None:
                image = Path(row["image"])
                row["image"] = str(image if image.is_absolute() else base / image)
                if not Path(row["image"]).is_file():
                    raise ValueError(f"{where}: image {row['image']} does not exist")
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

    model = MQSPNForGroundedNER.from_pretrained(args.model).eval()
    processor = MQSPNProcessor.from_pretrained(args.model)
    options = {}
    if args.proposer == "detector":
        if not args.detector:
            raise ValueError("--proposer detector needs --detector (a transformers object detector folder or Hub name)")
        options = {"proposer": "detector", "proposer_kwargs": {"model": args.detector, "device": args.device}}
    elif args.proposer == "vinvl":
        if not args.vinvl_dir:
            raise ValueError("--proposer vinvl needs --vinvl-dir (the folder of <IMGID>.jpg.npz files)")
        options = {"proposer": "vinvl", "proposer_kwargs": {"directory": args.vinvl_dir}}
    elif args.proposer == "selective-search":
        options = {"proposer": "selective-search"}
    if args.threshold is not None:
        options["threshold"] = args.threshold
    return pipeline(TASK, model=model, processor=processor, device=args.device, **options)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub id (model + processor)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="JSONL file of inputs (see the module docstring)")
    source.add_argument("--text", help="one tweet (with --image)")
    parser.add_argument("--image", help="the tweet's image (with --text)")
    parser.add_argument("--boxes", help="candidate boxes for --image as JSON: [[x1, y1, x2, y2], ...]")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--proposer", choices=["auto", "selective-search", "detector", "vinvl"], default="auto",
                        help="regions for images without boxes (auto: selective search when OpenCV contrib is installed)")
    parser.add_argument("--detector", help="object detector for --proposer detector")
    parser.add_argument("--vinvl-dir", help="VinVL .npz folder for --proposer vinvl")
    parser.add_argument("--threshold", type=float, help="existence threshold (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    args = parser.parse_args(argv)

    try:
        if args.input:
            if args.image or args.boxes:
                raise ValueError("--image / --boxes go with --text; in --input files they are per line")
            inputs = read_inputs(args.input)
        else:
            row = {"id": Path(args.image).stem if args.image else "text", "text": args.text}
            if args.image:
                if not os.path.isfile(args.image):
                    raise ValueError(f"--image {args.image} does not exist")
                row["image"] = args.image
            if args.boxes:
                try:
                    row["boxes"] = json.loads(args.boxes)
                except json.JSONDecodeError as error:
                    raise ValueError(f"--boxes is not valid JSON ({error.msg}); write [[x1, y1, x2, y2], ...]") from None
            inputs = [row]
        ner = build_pipeline(args)
        predictions = ner(inputs, batch_size=args.batch_size)
    except (OSError, ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from modeling_mqspn.proposers_mqspn import load_rgb_image
    from modeling_mqspn.visualize import draw_entities

    out = Path(args.output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    drawn = 0
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as handle:
        for row, entities in zip(inputs, predictions):
            record = {key: row[key] for key in ("id", "text", "words", "image") if key in row}
            record["entities"] = entities
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            if row.get("image"):
                png = out / "images" / png_name(row["id"])
                draw_entities(load_rgb_image(row["image"]), entities).save(png)
                drawn += 1
    grounded = sum(entity["box"] is not None for entities in predictions for entity in entities)
    total = sum(len(entities) for entities in predictions)
    print(f"{len(inputs)} input(s): {total} entities, {grounded} grounded; wrote {out / 'predictions.jsonl'} "
          f"and {drawn} PNG(s) in {out / 'images'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
