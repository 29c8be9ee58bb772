"""Bad and unusual images (docs/robustness.md, "Images"): every image path of the package — the shared
loader `image_utils.load_rgb_image`, `MQSPNProcessor`, the region proposers, the region feature cache and the
dataset readers — reads an image the same way, and an unreadable one is a clear, counted warning.

The helpers `tiny_processor` and `png_header` also serve the other robustness test files."""

import json
import logging
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertTokenizer, CLIPImageProcessor

from conftest import tiny_config
from modeling_mqspn import processing_mqspn
from modeling_mqspn.tools.data import load_jsonl
from modeling_mqspn.tools.feature_cache import RegionFeatureCache
from modeling_mqspn.image_utils import load_rgb_image, upright_image_size
from modeling_mqspn.modeling_mqspn import MQSPNForGroundedNER
from modeling_mqspn.processing_mqspn import MAX_PAD_SIDE, MQSPNProcessor
from modeling_mqspn.proposers_mqspn import GivenBoxesProposer

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz") + [
    "##" + c for c in "abcdefghijklmnopqrstuvwxyz"
]


def tiny_processor(max_regions=3, **kwargs):
    """A processor with a letter-level WordPiece vocabulary and 32-pixel CLIP crops."""
    tokenizer = BertTokenizer(vocab={word: index for index, word in enumerate(VOCAB)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torchvision-less fallback notice
        image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return MQSPNProcessor(image_processor=image_processor, tokenizer=tokenizer, max_regions=max_regions, **kwargs)


def png_header(width, height):
    """A PNG file that declares `width` x `height` 8-bit gray pixels and holds none: PIL reads its size from
    the header, so a huge declared size tests the decompression-bomb check without allocating anything."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def textured(width, height, seed=0):
    """An RGB image whose every pixel differs from its neighbours (rotations and crops show)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def write_bad_image(folder, kind):
    path = folder / f"{kind}.jpg"
    if kind == "corrupt":
        good = folder / "source.jpg"
        textured(40, 30).save(good, quality=90)
        data = bytearray(good.read_bytes())
        data[200:400] = bytes(200)  # the entropy-coded data zeroed: the decoder meets no valid Huffman codes
        data[2:4] = b"\x00\x00"  # and the first marker broken
        path.write_bytes(bytes(data))
    elif kind == "truncated":
        good = folder / "source.jpg"
        textured(40, 30).save(good, quality=90)
        data = good.read_bytes()
        path.write_bytes(data[: 2 * len(data) // 3])  # the header is whole, the pixels are not
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not-an-image":
        path.write_text("IMGID:123\nhello\tO\n", encoding="utf-8")
    elif kind == "bomb":
        path = folder / "bomb.png"
        path.write_bytes(png_header(20000, 20000))  # 4e8 pixels: more than twice PIL's default limit
    return path


BAD_KINDS = ("corrupt", "truncated", "empty", "not-an-image", "bomb")


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_unreadable_image_files_raise_a_value_error_naming_the_file(tmp_path, kind):
    path = write_bad_image(tmp_path, kind)
    with pytest.raises(ValueError, match=str(path.name)) as error:
        load_rgb_image(str(path))
    if kind == "bomb":
        assert "decompression bomb" in str(error.value) and "MAX_IMAGE_PIXELS" in str(error.value)
        with pytest.raises(ValueError, match="decompression bomb"):
            upright_image_size(path)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_processor_gives_an_unreadable_image_no_proposal_and_a_counted_warning(processor, tmp_path, kind):
    bad = write_bad_image(tmp_path, kind)
    good = tmp_path / "good.png"
    textured(40, 30).save(good)
    with pytest.warns(UserWarning, match=r"1 of 2 image\(s\) could not be read") as record:
        out = processor(words=[["ok"], ["bad"]], images=[str(good), str(bad)], boxes=[[[0, 0, 20, 20]]] * 2,
                        ids=["good", "bad"])
    assert any(f"bad (image" in str(item.message) and bad.name in str(item.message) for item in record)
    assert out["region_mask"].tolist() == [[True], [False]]
    assert out["image_sizes"].tolist() == [[40, 30], [0, 0]]


def test_data_reader_and_feature_cache_count_unreadable_images(tmp_path, caplog):
    kinds = ["truncated", "empty", "bomb"]
    paths = [write_bad_image(tmp_path, kind) for kind in kinds]
    rows = [{"id": kind, "words": ["a"], "entities": [], "image": path.name, "proposals": [[0, 0, 5, 5]]}
            for kind, path in zip(kinds, paths)]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    dataset, report = load_jsonl(str(jsonl))
    # Truncated: the header is fine, so the row keeps its image; the pixels fail later (processor, cache).
    assert report.warnings == {"unreadable_images": 2}
    assert dataset["image"][1] is None and dataset["image"][2] is None and dataset["image"][0] is not None
    torch.manual_seed(0)
    model = MQSPNForGroundedNER(tiny_config()).eval()
    cache = RegionFeatureCache(tmp_path / "cache", model, tiny_processor())
    with caplog.at_level(logging.WARNING, logger="modeling_mqspn.tools.feature_cache"):
        features = [cache.get(path, [[0, 0, 5, 5]]) for path in paths]
    assert [tuple(f.shape) for f in features] == [(0, 24)] * 3
    assert cache.missing_images == 3 and cache.tower_calls == 0
    assert "truncated.jpg" in caplog.text and "decompression bomb" in caplog.text


def uniform(mode, size=(40, 30)):
    """(image in `mode`, the 8-bit RGB colour it must be read as)."""
    if mode == "L":
        return Image.new("L", size, 128), (128, 128, 128)
    if mode == "CMYK":
        return Image.new("CMYK", size, (0, 255, 255, 0)), (255, 0, 0)
    if mode == "RGBA":
        return Image.new("RGBA", size, (200, 30, 30, 0)), (200, 30, 30)  # alpha dropped, colour kept
    if mode == "I;16":
        return Image.fromarray(np.full(size[::-1], 40000, dtype=np.uint16)), (156, 156, 156)  # 40000 / 257
    raise ValueError(mode)


@pytest.mark.parametrize("mode,suffix", [("L", "png"), ("CMYK", "jpg"), ("RGBA", "png"), ("I;16", "png")])
def test_grayscale_cmyk_rgba_and_16_bit_images_read_as_the_matching_rgb(processor, tmp_path, mode, suffix):
    image, expected = uniform(mode)
    path = tmp_path / f"image.{suffix}"
    image.save(path)
    assert Image.open(path).mode == mode
    loaded = load_rgb_image(str(path))
    assert loaded.mode == "RGB" and loaded.size == (40, 30)
    assert np.abs(np.asarray(loaded, dtype=int) - np.array(expected)).max() <= 1  # JPEG's CMYK rounding
    # The crops the model sees equal those of the equivalent RGB picture.
    reference = Image.new("RGB", (40, 30), tuple(int(v) for v in np.asarray(loaded)[0, 0]))
    box = [[5, 5, 30, 25]]
    out = processor(words=["a"], images=str(path), boxes=box)
    assert torch.allclose(out["pixel_values"][0], processor.prepare_crops(reference, box))
    assert GivenBoxesProposer([[0, 0, 100, 100]]).propose(str(path)) == [[0.0, 0.0, 40.0, 30.0]]


def test_sixteen_bit_contrast_is_kept_not_clipped_to_white(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    gray = np.asarray(load_rgb_image(str(path)))[0, :, 0]
    assert gray[0] == 0 and gray[-1] == 255 and np.all(np.diff(gray.astype(int)) >= 0)
    assert len(set(gray.tolist())) > 50  # PIL's own I;16 -> RGB conversion leaves a handful of levels


def rotated_copy(tmp_path, stored):
    """`stored` saved with EXIF orientation 6 (display rotated 90° clockwise) and the upright picture."""
    path = tmp_path / "rotated.jpg"
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(path, exif=exif, quality=100, subsampling=0)
    with Image.open(path) as opened:  # decoded as stored, turned by hand; no EXIF left on the copy
        upright = Image.fromarray(np.asarray(opened.convert("RGB").transpose(Image.Transpose.ROTATE_270)))
    return path, upright


def test_exif_rotated_images_are_read_upright_by_every_path(tmp_path):
    torch.manual_seed(0)
    path, upright = rotated_copy(tmp_path, textured(100, 50))
    assert upright.size == (50, 100)
    box = [[5.0, 40.0, 45.0, 95.0]]  # only inside the upright 50 x 100 picture
    # The shared loader, the proposers, the dataset reader and the processor agree on the upright size.
    assert load_rgb_image(str(path)).size == (50, 100) and upright_image_size(path) == (50, 100)
    assert np.array_equal(np.asarray(load_rgb_image(str(path))), np.asarray(upright))
    assert GivenBoxesProposer([[0, 0, 1000, 1000]]).propose(str(path)) == [[0.0, 0.0, 50.0, 100.0]]
    (tmp_path / "row.jsonl").write_text(json.dumps({"id": "r", "words": ["a"], "entities": [], "image": path.name}) + "\n")
    dataset, _ = load_jsonl(str(tmp_path / "row.jsonl"))
    assert dataset["image_size"] == [[50, 100]]
    processor = tiny_processor()
    out = processor(words=["a"], images=str(path), boxes=box)
    assert out["image_sizes"].tolist() == [[50, 100]] and out["region_boxes"][0].tolist() == box
    expected_crops = processor.prepare_crops(upright, box)
    assert torch.allclose(out["pixel_values"][0], expected_crops)
    # The feature cache crops the upright picture too: its features equal the tower on the upright crops.
    model = MQSPNForGroundedNER(tiny_config()).eval()
    cached = RegionFeatureCache(tmp_path / "cache", model, processor).get(path, box)
    with torch.no_grad():
        direct = model.encode_regions(expected_crops)
    assert torch.allclose(cached, direct, atol=1e-6)


def test_a_one_pixel_image_keeps_its_one_pixel_box_and_drops_thinner_ones(processor):
    image = Image.new("RGB", (1, 1), (10, 20, 30))
    with pytest.warns(UserWarning, match=r"dropped 1 non-finite, degenerate or duplicate"):
        out = processor(words=["a"], images=image, boxes=[[0, 0, 0.5, 0.5], [-5, -5, 5, 5]])
    assert out["region_boxes"][0].tolist() == [[0.0, 0.0, 1.0, 1.0]]
    assert out["pixel_values"].shape == (1, 1, 3, 32, 32)
    assert torch.isfinite(out["pixel_values"]).all()


def test_a_20000_by_100_image_is_cropped_through_a_bounded_square(processor, monkeypatch):
    image = Image.new("RGB", (20000, 100), (250, 250, 250))
    sides = []
    original_new = Image.new

    def recording_new(mode, size, *args, **kwargs):
        sides.append(max(size))
        return original_new(mode, size, *args, **kwargs)

    monkeypatch.setattr(processing_mqspn.Image, "new", recording_new)
    out = processor(words=["a"], images=image, boxes=[[0, 0, 20000, 100]])
    assert sides and max(sides) <= MAX_PAD_SIDE  # not a 20000 x 20000 square (1.2 GB, a minute)
    crop = out["pixel_values"][0, 0]  # (3, 32, 32): a thin bright band across the middle, mean-colour padding
    assert crop[:, 16, :].mean() > 0.1 and crop[:, 0, :].abs().max() < 0.02 and crop[:, -1, :].abs().max() < 0.02
    # Crops up to MAX_PAD_SIDE are not rescaled before padding, so ordinary photos crop as before.
    sides.clear()
    processor.prepare_crops(Image.new("RGB", (300, 20)), [[0, 0, 300, 20]])
    assert 300 in sides
