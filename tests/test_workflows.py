"""Real workflows that must not break (issue 13): a bad input fails only itself, a typo is refused with
the fix, one data path from your own JSONL to a published model, long runs that resume cleanly.
Each test failed on the commit before its fix."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from test_feature_cache import model, processor  # noqa: E402,F401  (fixtures)


# --------------------------------------------------------------------------------------------------
# Crashes and lost work


def test_a_tweet_with_proposals_but_no_image_file_trains_as_no_image(tmp_path, model, processor):  # noqa: F811
    from modeling_mqspn.tools.data import load_twitter_gmner
    from modeling_mqspn.tools.demo_data import DemoDataConfig, generate_demo_release
    from modeling_mqspn.tools.feature_cache import RegionFeatureCache
    from modeling_mqspn.tools.training import GroundedNERCollator

    release = tmp_path / "release"
    generate_demo_release(release, seed=0, config=DemoDataConfig(num_train=4, num_dev=2, num_test=2))
    images = sorted((release / "images").iterdir())
    images[0].unlink()  # its VinVL file stays: proposals without an image
    dataset, report = load_twitter_gmner(str(release / "train.txt"), xml_dir=str(release / "xml"),
                                         images_dir=str(release / "images"), vinvl_dir=str(release / "vinvl"), top_k=4)
    orphan = [row for row in dataset if row["image"] is None and row["proposals"]]
    assert orphan, "the fixture must hold a tweet with proposals and no image"
    cache = RegionFeatureCache(tmp_path / "cache", model, processor)
    stats = cache.precompute(dataset)  # IndexError before the fix
    assert stats["missing_images"] == len(orphan)
    collator = GroundedNERCollator(processor, lambda row: cache.get(row["image"], row["proposals"][:4]).numpy(),
                                   model.config.vision_config.hidden_size)
    batch = collator(orphan)
    assert not batch["region_mask"].any()  # "no image": only the ungroundable token
