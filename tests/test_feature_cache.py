"""RegionFeatureCache: features equal direct computation, a second pass never calls the tower, and a
changed tower, crop rule or image never reads a stale feature."""

import copy
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertTokenizer, CLIPImageProcessor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conftest import tiny_config  # noqa: E402
from modeling_mqspn.tools.data import load_twitter_gmner  # noqa: E402
from modeling_mqspn.tools.demo_data import DemoDataConfig, generate_demo_release  # noqa: E402
from modeling_mqspn.tools.feature_cache import RegionFeatureCache, vision_tower_fingerprint  # noqa: E402
from modeling_mqspn.modeling_mqspn import MQSPNForGroundedNER  # noqa: E402
from modeling_mqspn.processing_mqspn import MQSPNProcessor  # noqa: E402
from processing import cache_region_features  # noqa: E402

BOXES = [[3.25, 4.0, 30.7, 25.5], [10.0, 10.0, 60.0, 40.0], [0.0, 0.0, 79.0, 59.0], [40.5, 5.5, 52.5, 55.5]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MQSPNForGroundedNER(tiny_config()).eval()


def make_processor(tmp_path_factory, crop_mode="pad", **image_settings):
    folder = tmp_path_factory.mktemp("tokenizer")
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\n", encoding="utf-8")
    settings = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    settings.update(image_settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image_processor = CLIPImageProcessor(**settings)
    tokenizer = BertTokenizer.from_pretrained(str(folder))
    return MQSPNProcessor(image_processor=image_processor, tokenizer=tokenizer, crop_mode=crop_mode)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return make_processor(tmp_path_factory)


@pytest.fixture
def image_path(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(path, quality=95)
    return path


def direct(model, processor, path, boxes):
    with Image.open(path) as image:
        crops = processor.prepare_crops(image.convert("RGB"), np.asarray(boxes))
    with torch.no_grad():
        return model.encode_regions(crops).float()


def test_features_equal_direct_computation_and_a_second_pass_has_no_tower_call(tmp_path, model, processor, image_path):
    cache = RegionFeatureCache(tmp_path / "cache", model, processor, batch_size=3)
    first = cache.get(image_path, BOXES)
    assert first.shape == (4, model.config.vision_config.hidden_size) and first.dtype == torch.float32
    torch.testing.assert_close(first, direct(model, processor, image_path, BOXES), rtol=1e-5, atol=1e-5)
    assert cache.counters() == {"hits": 0, "misses": 4, "tower_calls": 2, "missing_images": 0}  # 3 + 1

    # Another run: a new cache object on the same folder reads everything from disk.
    again = RegionFeatureCache(tmp_path / "cache", model, processor)
    second = again.get(image_path, list(reversed(BOXES)))
    assert again.counters() == {"hits": 4, "misses": 0, "tower_calls": 0, "missing_images": 0}
    torch.testing.assert_close(second, first.flip(0), rtol=0, atol=0)


def test_only_new_boxes_are_computed_and_rounding_merges_near_identical_boxes(tmp_path, model, processor, image_path):
    cache = RegionFeatureCache(tmp_path, model, processor)
    cache.get(image_path, BOXES[:2])
    near = [[b + 0.001 for b in BOXES[0]], BOXES[2], BOXES[2]]  # within the rounding; a duplicate
    features = cache.get(image_path, near)
    # the near box and the repeated box are served without the tower; one new crop is computed
    assert cache.counters() == {"hits": 2, "misses": 3, "tower_calls": 2, "missing_images": 0}
    torch.testing.assert_close(features[1], features[2], rtol=0, atol=0)
    assert cache.get(image_path, []).shape == (0, model.config.vision_config.hidden_size)


def test_a_changed_crop_rule_or_image_processor_misses(tmp_path, tmp_path_factory, model, processor, image_path):
    RegionFeatureCache(tmp_path, model, processor).get(image_path, BOXES)
    for other in (
        make_processor(tmp_path_factory, crop_mode="center"),
        make_processor(tmp_path_factory, image_mean=[0.5, 0.5, 0.5]),
    ):
        cache = RegionFeatureCache(tmp_path, model, other)
        features = cache.get(image_path, BOXES)
        assert cache.hits == 0 and cache.misses == 4 and cache.tower_calls == 1
        torch.testing.assert_close(features, direct(model, other, image_path, BOXES), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(features, direct(model, processor, image_path, BOXES))
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 3  # one namespace per crop rule


def test_a_changed_padded_crop_limit_misses(tmp_path, model, processor, image_path, monkeypatch):
    """Crops longer than processing_mqspn.MAX_PAD_SIDE are scaled down before padding: the limit is part of
    the crop rule, so features cached under another limit are never served."""
    from modeling_mqspn import processing_mqspn

    RegionFeatureCache(tmp_path, model, processor).get(image_path, BOXES)
    monkeypatch.setattr(processing_mqspn, "MAX_PAD_SIDE", 16)
    cache = RegionFeatureCache(tmp_path, model, processor)
    cache.get(image_path, BOXES)
    assert cache.hits == 0 and cache.misses == 4


def test_changed_tower_weights_or_dtype_miss(tmp_path, model, processor, image_path):
    (POST_LAYERNORM_BIAS,) = [n for n, _ in model.vision_model.named_parameters() if n.endswith("post_layernorm.bias")]
    RegionFeatureCache(tmp_path, model, processor).get(image_path, BOXES)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        dict(changed.vision_model.named_parameters())[POST_LAYERNORM_BIAS].add_(0.5)
    assert vision_tower_fingerprint(changed) != vision_tower_fingerprint(model)
    cache = RegionFeatureCache(tmp_path, changed, processor)
    features = cache.get(image_path, BOXES)
    assert cache.hits == 0 and cache.tower_calls == 1
    torch.testing.assert_close(features, direct(changed, processor, image_path, BOXES), rtol=1e-5, atol=1e-5)
    # The rest of the model (trainable parts) does not change the key.
    trained = copy.deepcopy(model)
    with torch.no_grad():
        trained.region_projection.weight.add_(1.0)
    assert vision_tower_fingerprint(trained) == vision_tower_fingerprint(model)
    halved = copy.deepcopy(model)
    halved.vision_model.to(torch.bfloat16)
    assert vision_tower_fingerprint(halved) != vision_tower_fingerprint(model)


def test_images_are_keyed_by_content_not_path(tmp_path, model, processor, image_path):
    cache = RegionFeatureCache(tmp_path / "cache", model, processor)
    cache.get(image_path, BOXES)
    moved = tmp_path / "elsewhere.jpg"
    shutil.copy(image_path, moved)
    cache.get(moved, BOXES)
    assert cache.hits == 4 and cache.misses == 4
    Image.new("RGB", (80, 60), (10, 200, 10)).save(image_path)  # same path, new picture
    os.utime(image_path, ns=(1, 1))
    features = cache.get(image_path, BOXES)
    assert cache.misses == 8
    torch.testing.assert_close(features, direct(model, processor, image_path, BOXES), rtol=1e-5, atol=1e-5)


def test_missing_and_unreadable_images_give_zero_proposals_and_are_counted(tmp_path, model, processor, caplog):
    cache = RegionFeatureCache(tmp_path / "cache", model, processor)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with caplog.at_level(logging.WARNING, logger="modeling_mqspn.tools.feature_cache"):
        for path in (tmp_path / "absent.jpg", broken, tmp_path / "absent.jpg", None):
            assert cache.get(path, BOXES).shape == (0, model.config.vision_config.hidden_size)
    assert cache.missing_images == 2 and cache.tower_calls == 0
    assert "absent.jpg" in caplog.text and "broken.jpg" in caplog.text


def test_a_corrupt_cache_file_is_recomputed_with_a_warning(tmp_path, model, processor, image_path, caplog):
    cache = RegionFeatureCache(tmp_path, model, processor)
    expected = cache.get(image_path, BOXES)
    (entry,) = Path(cache.directory).glob("*/*.safetensors")
    entry.write_bytes(entry.read_bytes()[:40])
    with caplog.at_level(logging.WARNING, logger="modeling_mqspn.tools.feature_cache"):
        features = cache.get(image_path, BOXES)
    assert str(entry) in caplog.text and cache.misses == 8
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)


def test_bad_boxes_and_a_model_without_tower_are_refused(tmp_path, model, processor, image_path):
    cache = RegionFeatureCache(tmp_path, model, processor)
    with pytest.raises(ValueError, match=r"\(K, 4\)"):
        cache.get(image_path, [[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match=r"\(K, 4\)"):
        cache.get(image_path, [[1.0, 2.0, float("nan"), 4.0]])
    headless = MQSPNForGroundedNER(tiny_config(include_vision_tower=False))
    with pytest.raises(ValueError, match="include_vision_tower"):
        RegionFeatureCache(tmp_path, headless, processor)


@pytest.fixture(scope="module")
def demo_release(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    generate_demo_release(folder, seed=0, config=DemoDataConfig(num_train=10, num_dev=4, num_test=4))
    return folder


def test_precompute_a_demo_split_then_training_reads_only_the_cache(tmp_path, model, processor, demo_release):
    dataset, _ = load_twitter_gmner(
        str(demo_release / "train.txt"),
        xml_dir=str(demo_release / "xml"),
        images_dir=str(demo_release / "images"),
        vinvl_dir=str(demo_release / "vinvl"),
        top_k=model.config.max_regions,
    )
    cache = RegionFeatureCache(tmp_path, model, processor, batch_size=16)
    stats = cache.precompute(dataset)
    total = sum(len(row["proposals"]) for row in dataset)
    assert stats["rows"] == 10 and stats["boxes"] == total and stats["misses"] == total > 16
    assert stats["tower_calls"] < total // 4 + 2  # crops of several images share a tower call
    assert stats["missing_images"] == 0 and stats["hits"] == 0
    again = cache.precompute(dataset)
    assert again["tower_calls"] == 0 and again["hits"] == total
    # An "epoch" of get() is all hits and equals direct computation.
    calls = cache.tower_calls
    for row in dataset:
        features = cache.get(row["image"], row["proposals"])
        torch.testing.assert_close(
            features, direct(model, processor, row["image"], row["proposals"]), rtol=1e-5, atol=1e-5
        )
    assert cache.tower_calls == calls


def test_precompute_truncates_to_max_regions_and_counts_missing_images(tmp_path, model, processor, demo_release):
    image = str(demo_release / "images" / "100000.jpg")
    rows = [
        {"id": "a", "image": image, "proposals": BOXES[:2]},
        {"id": "b", "image": str(tmp_path / "gone.jpg"), "proposals": BOXES},
        {"id": "c", "image": None, "proposals": []},
        {"id": "d", "image": image, "proposals": [[0.0, 0.0, 10.0, 10.0 + i] for i in range(9)]},
    ]
    stats = RegionFeatureCache(tmp_path, model, processor).precompute(rows)
    k = model.config.max_regions  # 4 in the tiny config
    assert stats == {"rows": 4, "boxes": 2 + k + k, "missing_images": 1, "hits": 0, "misses": 2 + k, "tower_calls": 1}


def test_cache_region_features_cli_on_a_release_and_a_saved_model(tmp_path, model, processor, demo_release, capsys):
    model.save_pretrained(tmp_path / "checkpoint")
    processor.save_pretrained(tmp_path / "checkpoint")
    argv = ["--model", str(tmp_path / "checkpoint"), "--data", str(demo_release), "--cache_dir", str(tmp_path / "c"),
            "--splits", "dev", "test", "--batch_size", "8"]
    first = cache_region_features.main(argv)
    assert first["dev"]["misses"] > 0 and first["test"]["tower_calls"] > 0
    second = cache_region_features.main(argv)
    assert all(second[s]["tower_calls"] == 0 and second[s]["hits"] == first[s]["misses"] for s in ("dev", "test"))
