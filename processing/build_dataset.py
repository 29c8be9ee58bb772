"""Build a ``datasets`` dataset (docs/ARCHITECTURE.md "Dataset rows") from one split of a
Twitter-GMNER or Twitter-FMNERG release, or from the package's JSONL format (docs/DATA.md).

    python processing/build_dataset.py --dataset_format twitter-gmner --data_dir DIR --split dev \
        --output BUILT/dev [--images_dir DIR] [--vinvl_dir DIR] [--xml_dir DIR] \
        [--fmnerg_label_level coarse] [--top_k 18] [--entity_types PER,LOC,ORG,OTHER] \
        [--references_jsonl FILE]

Inputs: ``twitter-gmner`` reads ``DIR/<split>.txt`` and ``DIR/xml``; ``twitter-fmnerg`` reads
``DIR/<split>.txt`` and the Twitter-GMNER xml folder given by ``--xml_dir`` (default ``DIR/xml``,
or none when that folder does not exist); ``jsonl`` reads ``DIR/<split>.jsonl``. The dataset is
saved with ``save_to_disk(OUT)``; ``--references_jsonl`` also writes the evaluation references
(with the proposals when ``--vinvl_dir`` is given). ``--vinvl_dir`` also works for ``jsonl``: a row's
proposals then come from ``<vinvl_dir>/<image file name>.npz`` (``processing/propose_regions.py`` writes
these). Prints the counts and every kind of warning.

Build each split into ``BUILT/<split>`` (``--output BUILT/train``, ``--output BUILT/dev``, ...) and
train on the folder: ``examples/train.py --dataset_format saved --data_dir BUILT``. The options are
spelt as in ``examples/train.py``; the older ``--format``, ``--images``, ``--vinvl`` and
``--label_space`` still work.
"""

import argparse
import os
import sys
import time

from modeling_mqspn.tools.data import (
    FMNERG_LABEL_SPACES,
    GMNER_TYPES,
    load_jsonl,
    load_twitter_fmnerg,
    load_twitter_gmner,
    write_references_jsonl,
)

FORMATS = ("twitter-gmner", "twitter-fmnerg", "jsonl")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_format", "--format", dest="format", required=True, choices=FORMATS)
    parser.add_argument("--data_dir", required=True, help="folder holding <split>.txt / <split>.jsonl")
    parser.add_argument("--split", required=True, help="train, dev, test, ...")
    parser.add_argument("--output", required=True, help="folder for Dataset.save_to_disk")
    parser.add_argument("--images_dir", "--images", dest="images", help="image folder (<id>.jpg; jsonl: paths are relative to the file)")
    parser.add_argument("--vinvl_dir", "--vinvl", dest="vinvl", help="VinVL folder (<id>.jpg.npz; jsonl: <image file name>.npz, "
                        "e.g. from processing/propose_regions.py) for the proposals column")
    parser.add_argument("--xml_dir", help="Pascal VOC folder (default DATA_DIR/xml)")
    parser.add_argument("--fmnerg_label_level", "--label_space", dest="label_space", default="coarse",
                        choices=FMNERG_LABEL_SPACES, help="twitter-fmnerg only")
    parser.add_argument("--top_k", type=int, default=18, help="proposals kept per image")
    parser.add_argument(
        "--entity_types",
        help="comma-separated label space (twitter-gmner default PER,LOC,ORG,OTHER; jsonl default: any)",
    )
    parser.add_argument("--references_jsonl", help="also write the evaluation references here")
    args = parser.parse_args(argv)
    if args.format == "jsonl" and (args.images or args.xml_dir):
        parser.error("--images_dir and --xml_dir do not apply to --dataset_format jsonl (the file names them)")
    if args.format == "twitter-fmnerg" and args.entity_types:
        parser.error("--entity_types does not apply to twitter-fmnerg; use --fmnerg_label_level")
    return args


def build(args):
    entity_types = args.entity_types.split(",") if args.entity_types else None
    if args.format == "jsonl":
        return load_jsonl(os.path.join(args.data_dir, f"{args.split}.jsonl"), entity_types, args.top_k, args.vinvl)
    txt_path = os.path.join(args.data_dir, f"{args.split}.txt")
    xml_dir = args.xml_dir
    if xml_dir is None and os.path.isdir(os.path.join(args.data_dir, "xml")):
        xml_dir = os.path.join(args.data_dir, "xml")
    if xml_dir is None:
        print(f"note: no xml folder ({args.data_dir}/xml absent, no --xml_dir): every entity is ungroundable")
    if args.format == "twitter-gmner":
        return load_twitter_gmner(
            txt_path, xml_dir, args.images, args.vinvl, args.top_k, entity_types or GMNER_TYPES
        )
    return load_twitter_fmnerg(txt_path, xml_dir, args.label_space, args.images, args.vinvl, args.top_k)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        dataset, report = build(args)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"read in {time.perf_counter() - started:.1f} s")
    print(report.summary())
    dataset.save_to_disk(args.output)
    print(f"saved {len(dataset)} rows to {args.output}")
    if args.references_jsonl:
        written = write_references_jsonl(dataset, args.references_jsonl, include_proposals=bool(args.vinvl))
        print(f"wrote {written} references to {args.references_jsonl}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
