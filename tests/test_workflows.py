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


@pytest.fixture
def image_server(tmp_path):
    """A local HTTP server (127.0.0.1 only) serving tmp_path/www; yields its base URL."""
    import functools
    import http.server
    import threading

    from PIL import Image

    www = tmp_path / "www"
    www.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(www / "photo.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def closed_port_url():
    from conftest import free_port

    return f"http://127.0.0.1:{free_port()}/photo.png"


def test_image_urls_are_fetched_with_the_standard_library_a_timeout_and_a_size_cap(image_server, monkeypatch):
    from modeling_mqspn import image_utils

    monkeypatch.setitem(sys.modules, "httpx", None)  # a clean environment: importing httpx fails
    image = image_utils.load_rgb_image(f"{image_server}/photo.png")
    assert image.size == (60, 40) and image.mode == "RGB"
    with pytest.raises(ValueError, match="HTTP 404"):
        image_utils.load_rgb_image(f"{image_server}/missing.png")
    with pytest.raises(ValueError, match="unreachable"):
        image_utils.load_rgb_image(closed_port_url())
    monkeypatch.setattr(image_utils, "URL_MAX_BYTES", 100)
    with pytest.raises(ValueError, match="cap of 100 bytes"):
        image_utils.load_rgb_image(f"{image_server}/photo.png")


def test_an_unreachable_image_url_fails_only_its_item_in_a_pipeline_batch(image_server, monkeypatch):
    from transformers import pipeline

    from modeling_mqspn.pipeline_mqspn import TASK
    from test_pipeline import tiny_model_and_processor

    monkeypatch.setitem(sys.modules, "httpx", None)
    model, processor = tiny_model_and_processor()
    ner = pipeline(TASK, model=model, processor=processor, device="cpu")
    boxes = [[0, 0, 30, 30]]
    results = ner([
        {"id": "good", "text": "Messi in Paris", "image": f"{image_server}/photo.png", "boxes": boxes},
        {"id": "down", "text": "Messi in Paris", "image": closed_port_url(), "boxes": boxes},
    ], batch_size=2)
    assert isinstance(results[0], list) and results[0]
    assert results[1]["id"] == "down" and "unreachable" in results[1]["error"]
