"""VinVL ``.npz`` ingestion (docs/DESIGN.md §6, docs/DESIGN.md §10.3) on files the tests write."""

import numpy as np
import pytest

from modeling_mqspn.vinvl_mqspn import load_vinvl_proposals, vinvl_file


def write_npz(folder, image_id="123", **arrays):
    path = vinvl_file(str(folder), image_id)
    np.savez(path, **arrays)
    return path


def test_file_name_is_image_name_plus_npz(tmp_path):
    assert vinvl_file(str(tmp_path), "O_12") == str(tmp_path / "O_12.jpg.npz")


def test_sorted_by_score_clipped_sanitised_and_features_follow_boxes(tmp_path):
    boxes = np.array(
        [
            [10, 10, 50, 50],  # score 0.2
            [0, 0, 100, 100],  # score 0.9
            [0, 0, 100, 100],  # exact duplicate of the above, score 0.8
            [20, 20, 20.5, 60],  # degenerate (thinner than a pixel), score 0.7
            [np.nan, 0, 5, 5],  # non-finite, score 0.6
            [90, 90, 400, 300],  # outside the 200 x 150 image: clipped, score 0.5
            [300, 300, 400, 400],  # entirely outside: degenerate after clipping, score 0.4
        ],
        dtype=np.float32,
    )
    scores = np.array([0.2, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4], dtype=np.float32)
    features = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    path = write_npz(tmp_path, num_boxes=np.int64(7), bounding_boxes=boxes, scores=scores, box_features=features)

    result = load_vinvl_proposals(path, top_k=18, image_size=(200, 150))

    np.testing.assert_allclose(result.boxes, [[0, 0, 100, 100], [90, 90, 200, 150], [10, 10, 50, 50]])
    np.testing.assert_allclose(result.box_features, features[[1, 5, 0]])
    np.testing.assert_allclose(result.scores, [0.9, 0.5, 0.2])
    assert result.dropped == {"non_finite": 1, "degenerate": 2, "duplicate": 1}
    assert result.num_clipped == 1
    assert result.num_read == 7
    assert result.boxes.dtype == np.float32


def test_without_scores_keeps_file_order_and_top_k(tmp_path):
    boxes = np.array([[5, 5, 9, 9], [0, 0, 4, 4], [1, 1, 8, 8]], dtype=np.float32)
    path = write_npz(tmp_path, num_boxes=np.int64(3), bounding_boxes=boxes)
    result = load_vinvl_proposals(path, top_k=2)
    np.testing.assert_allclose(result.boxes, boxes[:2])
    assert result.box_features is None and result.scores is None


def test_only_the_first_num_boxes_rows_are_real(tmp_path):
    boxes = np.array([[0, 0, 4, 4], [1, 1, 8, 8], [0, 0, 0, 0]], dtype=np.float32)
    path = write_npz(tmp_path, num_boxes=np.int64(2), bounding_boxes=boxes)
    result = load_vinvl_proposals(path)
    np.testing.assert_allclose(result.boxes, boxes[:2])
    assert sum(result.dropped.values()) == 0


def test_no_boxes_gives_empty_arrays(tmp_path):
    path = write_npz(tmp_path, num_boxes=np.int64(0), bounding_boxes=np.zeros((0, 4), np.float32))
    result = load_vinvl_proposals(path)
    assert result.boxes.shape == (0, 4)


@pytest.mark.parametrize("missing", ["num_boxes", "bounding_boxes"])
def test_missing_key_names_file_and_key(tmp_path, missing):
    arrays = {"num_boxes": np.int64(1), "bounding_boxes": np.array([[0, 0, 4, 4]], np.float32)}
    del arrays[missing]
    path = write_npz(tmp_path, **arrays)
    with pytest.raises(ValueError, match=rf"{path}.*'{missing}'"):
        load_vinvl_proposals(path)


def test_inconsistent_shapes_are_errors_naming_the_file(tmp_path):
    path = write_npz(tmp_path, num_boxes=np.int64(3), bounding_boxes=np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=rf"{path}.*num_boxes"):
        load_vinvl_proposals(path)
    path = write_npz(tmp_path, "b", num_boxes=np.int64(1), bounding_boxes=np.zeros((1, 5), np.float32))
    with pytest.raises(ValueError, match=rf"{path}.*shape"):
        load_vinvl_proposals(path)


def test_object_arrays_are_never_unpickled(tmp_path):
    # The public dumps carry an object array of class names: it must not be read (or unpickled),
    # and a pickled array under a key we need is refused with the file and key named.
    boxes = np.array([[0, 0, 4, 4]], np.float32)
    path = write_npz(tmp_path, num_boxes=np.int64(1), bounding_boxes=boxes, objects=np.array(["man"], dtype=object))
    np.testing.assert_allclose(load_vinvl_proposals(path).boxes, boxes)
    path = write_npz(tmp_path, "p", num_boxes=np.int64(1), bounding_boxes=np.array([[0, 0, 4, 4]], dtype=object))
    with pytest.raises(ValueError, match=rf"{path}.*'bounding_boxes'"):
        load_vinvl_proposals(path)


def test_not_an_npz_file_and_missing_file(tmp_path):
    path = tmp_path / "bad.jpg.npz"
    path.write_text("not a zip")
    with pytest.raises(ValueError, match=str(path)):
        load_vinvl_proposals(str(path))
    with pytest.raises(FileNotFoundError, match="absent"):
        load_vinvl_proposals(str(tmp_path / "absent.jpg.npz"))
