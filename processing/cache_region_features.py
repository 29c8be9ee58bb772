"""Precompute the frozen vision tower's region features of a dataset into a RegionFeatureCache.

    python processing/cache_region_features.py --model CHECKPOINT --data demo_data --cache_dir .cache/regions
    python processing/cache_region_features.py --model CHECKPOINT --data built_dataset/ --splits train dev

``--model`` is a saved MQSPN checkpoint (model + processor, as ``save_pretrained`` writes them);
``--data`` is either a release folder in the Twitter-GMNER layout (``<split>.txt`` at its root or in
``txt/``, with ``xml/``, ``images/`` and ``vinvl/`` beside it, or the folders given by
``--xml_dir`` / ``--images_dir`` / ``--vinvl_dir``), or a dataset saved with ``save_to_disk``
(a ``DatasetDict`` or a single ``Dataset``). Running it twice computes nothing the second time:
the counts it prints show the hits.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from modeling_mqspn.tools.cli import UsageError, check_device, check_model_path
from modeling_mqspn.tools.data import load_twitter_gmner
from modeling_mqspn.tools.feature_cache import RegionFeatureCache
from modeling_mqspn.modeling_mqspn import MQSPNForGroundedNER
from modeling_mqspn.processing_mqspn import MQSPNProcessor

SPLITS = ("train", "dev", "test")


def _release_splits(args, parser, top_k):
    """{split: Dataset} read from a release folder with the Twitter-GMNER reader."""
    root = Path(args.data)
    txt_dir = root / "txt" if (root / "txt").is_dir() else root
    folders = {}
    for name in ("xml", "images", "vinvl"):
        given = getattr(args, f"{name}_dir")
        folder = Path(given) if given else root / name
        folders[name] = str(folder) if folder.is_dir() else None
    if folders["images"] is None or folders["vinvl"] is None:
        parser.error(
            f"{root}: no images/ or vinvl/ folder; pass --images_dir and --vinvl_dir (features need the "
            "images and their proposals)"
        )
    splits = {}
    for split in args.splits or SPLITS:
        txt = txt_dir / f"{split}.txt"
        if not txt.is_file():
            if args.splits:
                parser.error(f"split {split!r}: {txt} not found")
            continue
        dataset, report = load_twitter_gmner(
            str(txt), xml_dir=folders["xml"], images_dir=folders["images"], vinvl_dir=folders["vinvl"], top_k=top_k
        )
        splits[split] = dataset
    return splits


def _saved_splits(args, parser):
    """{split: Dataset} from a ``save_to_disk`` folder."""
    from datasets import Dataset, load_from_disk

    data = load_from_disk(args.data)
    if isinstance(data, Dataset):
        return {"all": data}
    names = args.splits or list(data.keys())
    missing = [name for name in names if name not in data]
    if missing:
        parser.error(f"{args.data} has splits {list(data.keys())}, not {missing}")
    return {name: data[name] for name in names}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="saved MQSPN checkpoint folder (model + processor)")
    parser.add_argument("--processor", help="processor folder if not the --model folder")
    parser.add_argument("--data", required=True, help="release folder or save_to_disk dataset folder")
    parser.add_argument("--cache_dir", required=True)
    parser.add_argument("--splits", nargs="+", help="default: every split found")
    parser.add_argument("--xml_dir")
    parser.add_argument("--images_dir")
    parser.add_argument("--vinvl_dir")
    parser.add_argument("--batch_size", type=int, default=64, help="crops per vision-tower call")
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        check_model_path(args.model)
        check_device(args.device)
    except UsageError as error:
        parser.exit(2, f"error: {error}\n")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    model = MQSPNForGroundedNER.from_pretrained(args.model).to(args.device).eval()
    processor = MQSPNProcessor.from_pretrained(args.processor or args.model)
    if os.path.exists(os.path.join(args.data, "dataset_dict.json")) or os.path.exists(
        os.path.join(args.data, "dataset_info.json")
    ):
        splits = _saved_splits(args, parser)
    else:
        splits = _release_splits(args, parser, model.config.max_regions)
    if not splits:
        parser.error(f"{args.data}: no split found (looked for {', '.join(SPLITS)})")
    cache = RegionFeatureCache(args.cache_dir, model, processor, batch_size=args.batch_size)
    results = {name: cache.precompute(dataset) for name, dataset in splits.items()}
    print(json.dumps({"cache": cache.directory, **results}, indent=2))
    return results


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
