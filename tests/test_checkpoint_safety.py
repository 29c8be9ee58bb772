"""Checkpoints (docs/robustness.md, "Checkpoints"): a config that disagrees with its weights is refused instead
of leaving parameters randomly initialised or ignored, weights are read from safetensors only, and a pickle
offered as weights is refused without ever being unpickled."""

import json
import pickle
import shutil

import pytest
import torch

from conftest import make_batch, tiny_config
from modeling_mqspn import MQSPNForGroundedNER


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("checkpoint")
    MQSPNForGroundedNER(tiny_config()).eval().save_pretrained(folder)
    return folder


def copy_with(checkpoint, tmp_path, **changes):
    """The checkpoint with config.json fields changed (nested dicts are merged)."""
    folder = tmp_path / "edited"
    shutil.copytree(checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_faithful_checkpoint_loads_whole_with_its_loading_info(checkpoint):
    torch.manual_seed(0)
    original = MQSPNForGroundedNER(tiny_config()).eval()
    model, info = MQSPNForGroundedNER.from_pretrained(checkpoint, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    batch = make_batch(original.config, [5, 3], [2, 0], [1, 0])
    batch.pop("labels")
    with torch.no_grad():
        assert torch.allclose(model.eval()(**batch).start_logits, original(**batch).start_logits)


@pytest.mark.parametrize("changes,message", [
    ({"num_fusion_layers": 3}, r"48 parameter\(s\) of the model its config describes are not in the weights"),
    ({"num_fusion_layers": 1}, r"48 weight\(s\) have no place in that model"),
    ({"use_entity_queries": False}, r"weight\(s\) have no place .*entity_queries"),
])
def test_config_and_weights_that_disagree_in_structure_are_refused(checkpoint, tmp_path, changes, message):
    folder = copy_with(checkpoint, tmp_path, **changes)
    with pytest.raises(ValueError, match=message) as error:
        MQSPNForGroundedNER.from_pretrained(folder)
    assert str(folder) in str(error.value) and "config.json and the weights disagree" in str(error.value)


@pytest.mark.parametrize("changes", [
    {"num_queries": 12},
    {"entity_types": ["A", "B", "C"], "type_verbalizers": ["a", "b", "c"]},
    {"text_config": {"hidden_size": 64}},
])
def test_config_and_weights_that_disagree_in_shape_are_refused(checkpoint, tmp_path, changes):
    folder = copy_with(checkpoint, tmp_path, **changes)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        MQSPNForGroundedNER.from_pretrained(folder)


def test_settings_that_do_not_shape_weights_may_differ(checkpoint, tmp_path):
    model = MQSPNForGroundedNER.from_pretrained(copy_with(checkpoint, tmp_path, max_regions=9, existence_threshold=0.3))
    assert model.config.max_regions == 9 and model.config.existence_threshold == 0.3


class CreatesAFileWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_offered_as_weights_is_refused_and_never_unpickled(checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "pickled"
    shutil.copytree(checkpoint, folder)
    state = MQSPNForGroundedNER.from_pretrained(checkpoint).state_dict()
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")  # a faithful, harmless pickle of the very same weights
    with pytest.raises(OSError, match="no file named model.safetensors"):
        MQSPNForGroundedNER.from_pretrained(folder)
    with pytest.raises(ValueError, match="safetensors weights only"):
        MQSPNForGroundedNER.from_pretrained(folder, use_safetensors=False)
    with open(folder / "pytorch_model.bin", "wb") as handle:  # a hostile one
        pickle.dump({"weight": CreatesAFileWhenUnpickled(str(marker))}, handle)
    with pytest.raises(OSError, match="no file named model.safetensors"):
        MQSPNForGroundedNER.from_pretrained(folder)
    shutil.copyfile(folder / "pytorch_model.bin", folder / "model.safetensors")  # renamed to look safe
    with pytest.raises(ValueError, match="is not valid safetensors .*header"):
        MQSPNForGroundedNER.from_pretrained(folder)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_weights_file_is_a_clear_error(checkpoint, tmp_path, damage):
    folder = tmp_path / "damaged"
    shutil.copytree(checkpoint, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(ValueError, match=f"checkpoint '{folder}': the weights file is not valid safetensors"):
        MQSPNForGroundedNER.from_pretrained(folder)
