"""Region proposals for a folder of photos, in the VinVL layout the readers take, and their coverage.

    python processing/propose_regions.py --images DIR --output PROPOSALS_DIR --proposer NAME \
        [--detector MODEL] [--top_k 18] [--batch_size 8] [--device cuda] [--overwrite]
    python processing/propose_regions.py --report --data_dir RELEASE --split dev \
        --proposals PROPOSALS_DIR [--proposals vinvl=RELEASE/vinvl] [--k 1,5,10,18]

Proposing writes ``PROPOSALS_DIR/<image file name>.npz`` (``num_boxes``, ``bounding_boxes``, ``scores``)
for every image of ``--images`` (``modeling_mqspn/tools/regions.py``), so ``examples/train.py
--vinvl_dir PROPOSALS_DIR`` and ``processing/build_dataset.py --vinvl PROPOSALS_DIR`` use them as they
use the releases' VinVL files. Proposers (``modeling_mqspn/proposers_mqspn.py``), each class-agnostic
top-k, sorted by score, clipped to the image, degenerate and duplicate boxes dropped:

* ``detector``: any transformers object detector (``--detector``, default PekingU/rtdetr_r50vd);
* ``owlv2``: OWLv2's objectness scores (default google/owlv2-base-patch16-ensemble), NMS at 0.5;
* ``grounding-dino``: an open-vocabulary detector (default IDEA-Research/grounding-dino-tiny) prompted
  with the entity-type words (``--type_words``, ``--config`` a recipe or checkpoint whose type
  verbalisers to use, or ``--prompt``; default "person. location. organization. thing.");
* ``selective-search``: OpenCV selective search, no weights (pip install opencv-contrib-python-headless).

Images already done are skipped (``--overwrite`` redoes them), so a killed run resumes; an unreadable
image is counted and listed, never fatal; the JSON summary is printed at the end and kept in
``PROPOSALS_DIR/propose_regions.json``.

``--report`` reads a release's gold boxes (``--format twitter-gmner``: ``DATA_DIR/<split>.txt`` and
``DATA_DIR/xml``; ``--format jsonl``: ``DATA_DIR/<split>.jsonl``) and prints, for every ``--proposals``
folder (``NAME=DIR``, or ``DIR`` named after its folder; default the ``--output`` just written) and every
k, the share of groundable gold entities whose box some proposal covers at IoU >= 0.5 — per type and
overall, the ceiling the proposals put on EEG and GMNER — as a table, and as JSON with ``--report_json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_MODELS = {
    "detector": "PekingU/rtdetr_r50vd",
    "owlv2": "google/owlv2-base-patch16-ensemble",
    "grounding-dino": "IDEA-Research/grounding-dino-tiny",
}
PROPOSERS = ("detector", "owlv2", "grounding-dino", "selective-search")
REPORT_FORMATS = ("twitter-gmner", "jsonl")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    propose = parser.add_argument_group("proposing")
    propose.add_argument("--images", help="folder of photos (its image files; not recursive)")
    propose.add_argument("--output", help="folder for the <image file name>.npz files")
    propose.add_argument("--proposer", choices=PROPOSERS, help="where the boxes come from")
    propose.add_argument("--detector", help=f"model folder or Hub name (defaults: {DEFAULT_MODELS})")
    propose.add_argument("--top_k", type=int, default=None, help="boxes per image (default: MQSPN's max_regions, 18)")
    propose.add_argument("--batch_size", type=int, default=8, help="images per forward pass")
    propose.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    propose.add_argument("--nms_iou", type=float, default=None,
                         help="non-maximum suppression IoU (default: 0.5 for owlv2, none for the detectors)")
    propose.add_argument("--threshold", type=float, default=0.0, help="detector: lowest score kept")
    propose.add_argument("--prompt", help="grounding-dino: the text prompt, e.g. 'person. car. dog.'")
    propose.add_argument("--type_words", help="grounding-dino: comma-separated type words (prompt built from them)")
    propose.add_argument("--config", help="grounding-dino: a training recipe (.json) or MQSPN checkpoint folder whose "
                         "type verbalisers make the prompt")
    propose.add_argument("--overwrite", action="store_true", help="redo images whose file exists")
    propose.add_argument("--no_progress", action="store_true", help="no progress bar")
    report = parser.add_argument_group("coverage report")
    report.add_argument("--report", action="store_true", help="print the coverage of the proposals on a release")
    report.add_argument("--data_dir", help="release folder (<split>.txt and xml/, or <split>.jsonl)")
    report.add_argument("--format", default="twitter-gmner", choices=REPORT_FORMATS)
    report.add_argument("--split", default="dev", help="comma-separated splits (default dev)")
    report.add_argument("--xml_dir", help="Pascal VOC folder (default DATA_DIR/xml)")
    report.add_argument("--entity_types", help="twitter-gmner: comma-separated label space (default PER,LOC,ORG,OTHER)")
    report.add_argument("--proposals", action="append", default=[], help="NAME=DIR or DIR, repeatable")
    report.add_argument("--k", default=None, help="comma-separated k values (default 1,5,10,TOP_K)")
    report.add_argument("--report_json", help="also write the report here")
    args = parser.parse_args(argv)
    proposing = any(v is not None for v in (args.images, args.output, args.proposer))
    if proposing and not (args.images and args.output and args.proposer):
        parser.error("proposing needs --images, --output and --proposer")
    if not proposing and not args.report:
        parser.error("give --images, --output and --proposer to propose, and/or --report with --data_dir")
    if args.report and not args.data_dir:
        parser.error("--report needs --data_dir")
    if args.report and not args.proposals and not proposing:
        parser.error("--report needs --proposals DIR (or the --output of a proposing run)")
    if sum(v is not None for v in (args.prompt, args.type_words, args.config)) > 1:
        parser.error("give at most one of --prompt, --type_words, --config")
    return args


def type_words_from(path: str):
    """The type verbalisers of an MQSPN checkpoint folder or of a training recipe's model_config."""
    from modeling_mqspn import MQSPNConfig
    from modeling_mqspn.tools.training import load_recipe

    if os.path.isdir(path):
        return MQSPNConfig.from_pretrained(path).type_verbalizers
    model_config = load_recipe(path).get("model_config", {})
    fields = {key: model_config[key] for key in ("entity_types", "type_verbalizers") if key in model_config}
    return MQSPNConfig(**fields).type_verbalizers


def make_proposer(args, top_k: int):
    """The proposer the options ask for, and the settings recorded with its files."""
    from modeling_mqspn.proposers_mqspn import get_proposer

    settings = {"proposer": args.proposer, "top_k": top_k}
    kwargs = {}
    if args.proposer in DEFAULT_MODELS:
        import torch

        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        kwargs.update(model=args.detector or DEFAULT_MODELS[args.proposer], device=device)
        settings["detector"] = kwargs["model"]
        if args.nms_iou is not None:
            kwargs["nms_iou"] = args.nms_iou
        if args.proposer == "detector":
            kwargs["threshold"] = args.threshold
            settings["threshold"] = args.threshold
        if args.proposer == "grounding-dino":
            if args.prompt is not None:
                kwargs["prompt"] = args.prompt
            elif args.type_words is not None:
                kwargs["type_words"] = [w for w in args.type_words.split(",") if w.strip()]
            elif args.config is not None:
                kwargs["type_words"] = type_words_from(args.config)
    elif args.detector is not None:
        raise SystemExit(f"--detector does not apply to --proposer {args.proposer}")
    proposer = get_proposer(args.proposer, top_k=top_k, **kwargs)
    settings["nms_iou"] = proposer.nms_iou
    if hasattr(proposer, "prompt"):
        settings["prompt"] = proposer.prompt
    return proposer, settings


def read_rows(args, proposals_dir: str, top_k: int):
    """The report's rows with proposals from ``proposals_dir`` and how many tweets had no proposal file."""
    from modeling_mqspn.tools.data import GMNER_TYPES, load_jsonl, load_twitter_gmner

    rows, missing = [], 0
    for split in [s for s in args.split.split(",") if s]:
        if args.format == "jsonl":
            dataset, report = load_jsonl(os.path.join(args.data_dir, f"{split}.jsonl"), top_k=top_k, vinvl_dir=proposals_dir)
        else:
            xml_dir = args.xml_dir or os.path.join(args.data_dir, "xml")
            entity_types = args.entity_types.split(",") if args.entity_types else GMNER_TYPES
            dataset, report = load_twitter_gmner(
                os.path.join(args.data_dir, f"{split}.txt"), xml_dir if os.path.isdir(xml_dir) else None,
                vinvl_dir=proposals_dir, top_k=top_k, entity_types=entity_types,
            )
        rows.extend(dataset)
        missing += report.counts["missing_proposal_files"]
    return rows, missing


def main(argv=None) -> int:
    args = parse_args(argv)
    from modeling_mqspn.configuration_mqspn import DEFAULT_MAX_REGIONS

    top_k = args.top_k if args.top_k is not None else DEFAULT_MAX_REGIONS
    if top_k < 1:
        raise SystemExit(f"--top_k must be at least 1, got {top_k}")
    summary = None
    if args.images:
        from modeling_mqspn.tools.regions import propose_folder

        try:
            proposer, settings = make_proposer(args, top_k)
            summary = propose_folder(args.images, args.output, proposer, batch_size=args.batch_size,
                                     overwrite=args.overwrite, progress=not args.no_progress, settings=settings)
        except (OSError, ValueError, ImportError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(json.dumps(summary, indent=2))
        for failure in summary["failures"][:10]:
            print(f"failed: {failure['image']}: {failure['error']}", file=sys.stderr)
        print(f"{summary['proposed']} proposed, {summary['skipped_existing']} already done, {summary['failed']} failed "
              f"(of {summary['images']} images); summary in {os.path.join(args.output, 'propose_regions.json')}")
    if args.report:
        from modeling_mqspn.tools.regions import coverage_report, format_coverage_table

        ks = [int(k) for k in args.k.split(",")] if args.k else sorted({1, 5, 10, top_k})
        folders = list(args.proposals) or [f"{args.proposer}={args.output}"]
        rows_by_proposer, missing = {}, {}
        try:
            for entry in folders:
                name, _, folder = entry.rpartition("=") if "=" in entry else ("", "", entry)
                name = name or os.path.basename(os.path.normpath(folder))
                if not os.path.isdir(folder):
                    raise FileNotFoundError(f"--proposals {entry}: {folder} is not a folder")
                rows_by_proposer[name], missing[name] = read_rows(args, folder, max(ks))
            report = coverage_report(rows_by_proposer, ks)
        except (OSError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        report["tweets_without_proposal_file"] = missing
        print(format_coverage_table(report))
        for name, count in missing.items():
            if count:
                print(f"note: {count} tweet(s) have no proposal file in {name}'s folder; their entities count as uncovered")
        if args.report_json:
            with open(args.report_json, "w", encoding="utf-8") as handle:
                json.dump(report, handle, indent=2)
            print(f"wrote {args.report_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
