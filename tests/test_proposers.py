"""Region proposers (docs/DESIGN.md §6): every kind returns at most k valid boxes for a real JPEG, in its
own best-first order, and bad input fails with a message that says what to do."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from modeling_mqspn.box_ops import box_iou
from modeling_mqspn.proposers_mqspn import (
    DetectorProposer,
    GivenBoxesProposer,
    SelectiveSearchProposer,
    VinVLProposer,
    get_proposer,
    load_rgb_image,
    selective_search_available,
)

WIDTH, HEIGHT = 160, 120
K = 4


def paint_scene(path, width=WIDTH, height=HEIGHT, seed=0):
    """A photo-like JPEG: a noisy vertical gradient with three coloured objects."""
    rng = np.random.RandomState(seed)
    sky = np.linspace(60, 200, height)[:, None, None] * np.ones((height, width, 3))
    image = Image.fromarray((sky + rng.randn(height, width, 3) * 8).clip(0, 255).astype("uint8"))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0.1 * width, 0.15 * height, 0.4 * width, 0.85 * height], fill=(200, 30, 30))
    draw.ellipse([0.55 * width, 0.25 * height, 0.9 * width, 0.7 * height], fill=(20, 120, 220))
    draw.rectangle([0.45 * width, 0.6 * height, 0.7 * width, 0.95 * height], fill=(40, 160, 60))
    image.save(path, quality=90)
    return path


def tiny_yolos(folder, seed=0):
    """A randomly initialised one-layer YOLOS detector with 10 detection tokens, saved to `folder`."""
    from transformers import YolosConfig, YolosForObjectDetection, YolosImageProcessor

    torch.manual_seed(seed)
    config = YolosConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
        image_size=[64, 64], patch_size=16, num_detection_tokens=10, num_labels=3,
    )
    model = YolosForObjectDetection(config)
    with torch.no_grad():  # distinct detection tokens, so that the 10 detections differ
        model.vit.embeddings.detection_tokens.normal_(0.0, 1.0)
    model.save_pretrained(folder)
    YolosImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(folder)
    return folder


def assert_valid(boxes, k=K, width=WIDTH, height=HEIGHT):
    assert 0 < len(boxes) <= k
    for box in boxes:
        assert len(box) == 4 and all(np.isfinite(box))
        x1, y1, x2, y2 = box
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, box
    assert len({tuple(box) for box in boxes}) == len(boxes), "duplicate boxes"


@pytest.fixture
def scene(tmp_path):
    return str(paint_scene(tmp_path / "1015799.jpg"))


def test_given_boxes_are_clipped_deduplicated_and_capped(scene):
    proposer = get_proposer(
        "boxes",
        top_k=K,
        boxes=[[-10, -5, 50, 40], [5, 5, 5, 60], [-10, -5, 50, 40], [20, 20, 90, 100], [30, 0, 400, 300],
               [1, 1, 2, 2], [2, 2, 9, 9]],
    )
    boxes = proposer.propose(scene)
    assert_valid(boxes)
    # Clipped to the image; the zero-width and the duplicate box are dropped and counted; k cuts the rest.
    assert boxes == [[0.0, 0.0, 50.0, 40.0], [20.0, 20.0, 90.0, 100.0], [30.0, 0.0, 160.0, 120.0], [1.0, 1.0, 2.0, 2.0]]
    assert proposer.num_dropped == 2


def test_given_boxes_of_wrong_shape_are_rejected():
    with pytest.raises(ValueError, match=r"\[x1, y1, x2, y2\]"):
        GivenBoxesProposer([[1, 2, 3]])


def test_vinvl_proposer_reads_the_image_s_npz_by_file_name(scene, tmp_path):
    vinvl = tmp_path / "vinvl"
    vinvl.mkdir()
    boxes = np.array([[10, 10, 60, 60], [0, 0, 500, 500], [20, 30, 80, 90], [5, 5, 5.5, 70], [40, 40, 120, 110],
                      [15, 15, 30, 30]], dtype=np.float32)
    scores = np.array([0.2, 0.9, 0.5, 0.95, 0.7, 0.1], dtype=np.float32)
    np.savez(vinvl / "1015799.jpg.npz", num_boxes=np.array(6), bounding_boxes=boxes, scores=scores)

    proposer = get_proposer("vinvl", top_k=K, directory=str(vinvl))
    found = proposer.propose(scene)
    assert_valid(found)
    # Descending score, the whole-image box clipped, the half-pixel-wide box (score 0.95) dropped.
    assert found == [[0.0, 0.0, 160.0, 120.0], [40.0, 40.0, 120.0, 110.0], [20.0, 30.0, 80.0, 90.0], [10.0, 10.0, 60.0, 60.0]]
    assert proposer.num_dropped == 1
    # A PIL image opened from the file keeps its name; pixels without a name cannot be looked up.
    with Image.open(scene) as opened:
        assert proposer.propose(opened) == found
    with pytest.raises(ValueError, match="file name"):
        proposer.propose(Image.new("RGB", (WIDTH, HEIGHT)))


def test_vinvl_proposer_names_missing_directory_and_file(tmp_path, scene):
    with pytest.raises(ValueError, match="does not exist"):
        VinVLProposer(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="1015799.jpg.npz"):
        VinVLProposer(str(tmp_path / "empty")).propose(scene)


def test_detector_proposer_keeps_the_top_k_detections_class_agnostically(scene, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    folder = tiny_yolos(str(tmp_path / "yolos"))
    proposer = get_proposer("detector", top_k=K, model=folder)
    assert isinstance(proposer, DetectorProposer)
    boxes = proposer.propose(scene)
    assert_valid(boxes)

    # The same boxes, best first, as the detector's own post-processing ranks all 10 detections.
    model = AutoModelForObjectDetection.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        outputs = model(**processor(images=Image.open(scene).convert("RGB"), return_tensors="pt"))
    (result,) = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(HEIGHT, WIDTH)])
    assert len(result["scores"]) == 10
    ranked = result["boxes"][torch.argsort(result["scores"], descending=True)]
    ranked = ranked.clamp(min=0).minimum(torch.tensor([WIDTH, HEIGHT, WIDTH, HEIGHT], dtype=ranked.dtype))
    expected = [box for box in ranked.tolist() if box[2] - box[0] >= 1 and box[3] - box[1] >= 1][:K]
    assert np.allclose(boxes, expected, atol=1e-4)


def test_detector_proposer_needs_an_object_detection_image_processor():
    from transformers import CLIPImageProcessor, YolosConfig, YolosForObjectDetection

    model = YolosForObjectDetection(YolosConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=37, image_size=[64, 64], patch_size=16))
    with pytest.raises(ValueError, match="image_processor"):
        DetectorProposer(model)
    with pytest.raises(ValueError, match="post_process_object_detection"):
        DetectorProposer(model, image_processor=CLIPImageProcessor())


@pytest.mark.skipif(
    not selective_search_available(),
    reason="OpenCV contrib (cv2.ximgproc) is not installed: pip install opencv-contrib-python-headless",
)
def test_selective_search_returns_k_distinct_boxes_deterministically(scene):
    proposer = get_proposer("selective-search", top_k=K)
    assert isinstance(proposer, SelectiveSearchProposer)
    boxes = proposer.propose(scene)
    assert len(boxes) == K
    assert_valid(boxes)
    assert proposer.propose(scene) == boxes, "the order must not depend on OpenCV's random ranking"
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert box_iou(a, b) < proposer.nms_iou
    # Large images are searched at max_side and the boxes scaled back to the original pixels.
    big = Image.open(scene).resize((WIDTH * 4, HEIGHT * 4))
    scaled = SelectiveSearchProposer(top_k=K, max_side=WIDTH).propose(big)
    assert_valid(scaled, width=WIDTH * 4, height=HEIGHT * 4)
    assert max(box[2] for box in scaled) > WIDTH


def test_get_proposer_by_object_and_errors():
    class Fixed:
        def propose(self, image):
            return [[0, 0, 1, 1]]

    fixed = Fixed()
    assert get_proposer(fixed) is fixed
    with pytest.raises(ValueError, match="only for a proposer given by name"):
        get_proposer(fixed, directory="x")
    with pytest.raises(ValueError, match="unknown proposer 'yolo'"):
        get_proposer("yolo")
    with pytest.raises(TypeError, match="proposer 'vinvl'"):
        get_proposer("vinvl")
    with pytest.raises(ValueError, match="top_k"):
        get_proposer("boxes", top_k=-1, boxes=[])


def test_load_rgb_image_sources(scene, tmp_path):
    reference = np.asarray(load_rgb_image(scene))
    assert reference.shape == (HEIGHT, WIDTH, 3)
    encoded = base64.b64encode(open(scene, "rb").read()).decode()
    assert np.array_equal(np.asarray(load_rgb_image(encoded)), reference)
    assert np.array_equal(np.asarray(load_rgb_image("data:image/jpeg;base64," + encoded)), reference)
    assert np.array_equal(np.asarray(load_rgb_image(reference)), reference)
    gray = Image.fromarray(reference[:, :, 0])
    assert load_rgb_image(gray).mode == "RGB"
    with pytest.raises(ValueError, match="neither an existing file"):
        load_rgb_image(str(tmp_path / "missing.jpg"))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot be read"):
        load_rgb_image(str(tmp_path / "broken.jpg"))
    with pytest.raises(TypeError, match="PIL image"):
        load_rgb_image(12)


def test_exif_orientation_is_applied(tmp_path):
    """Boxes must fit the upright image the processor crops, not the stored pixel grid."""
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif.tobytes())
    path = tmp_path / "rotated.jpg"
    path.write_bytes(buffer.getvalue())
    assert load_rgb_image(str(path)).size == (20, 40)
    assert GivenBoxesProposer([[0, 0, 100, 100]]).propose(str(path)) == [[0.0, 0.0, 20.0, 40.0]]
