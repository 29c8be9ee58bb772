"""A saved checkpoint loads through `AutoModel.from_pretrained(dir, trust_remote_code=True)` in a fresh Python
where the `modeling_mqspn` package cannot be imported, from the modules `save_pretrained` copied into the
checkpoint, and gives the same outputs as the model that saved it."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from conftest import make_batch, tiny_config
from safetensors.torch import load_file, save_file

from modeling_mqspn import MQSPNForGroundedNER

# Runs in the subprocess. `python -I` keeps the repository and PYTHONPATH off sys.path; the finder below also
# hides an installed (e.g. `pip install -e .`) modeling_mqspn, so only the checkpoint's own copy can serve.
REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import json
    import sys

    class HidePackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "modeling_mqspn":
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
            return None

    sys.meta_path.insert(0, HidePackage())
    try:
        import modeling_mqspn  # noqa: F401
    except ModuleNotFoundError:
        importable = False
    else:
        importable = True

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    checkpoint, inputs_path, outputs_path = sys.argv[1:4]
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    inputs = load_file(inputs_path)
    labels = [
        {key: inputs.pop(f"labels.{b}.{key}") for key in ("start", "end", "type", "regions")}
        for b in range(int(inputs.pop("num_labels")))
    ]
    with torch.no_grad():
        outputs = model(**inputs, labels=labels)
    save_file(
        {
            "loss": outputs.loss,
            "existence_logits": outputs.existence_logits,
            "start_logits": outputs.start_logits,
            "end_logits": outputs.end_logits,
            "region_logits": outputs.region_logits,
        },
        outputs_path,
    )
    print(json.dumps({
        "importable": importable,
        "model_module": type(model).__module__,
        "sys_modules": sorted(name for name in sys.modules if name.split(".")[0] == "modeling_mqspn"),
        "vision_trainable": any(p.requires_grad for p in model.vision_model.parameters()),
    }))
    """
)


def test_automodel_with_trust_remote_code_in_a_process_without_the_package(tmp_path):
    torch.manual_seed(0)
    model = MQSPNForGroundedNER(tiny_config()).eval()
    batch = make_batch(model.config, [5, 3, 6], [2, 0, 3], [2, 0, 1], pixels=True)
    with torch.no_grad():
        expected = model(**batch)
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    copied = sorted(path.name for path in checkpoint.glob("*.py"))
    assert {"configuration_mqspn.py", "modeling_mqspn.py", "matching_mqspn.py"} <= set(copied)
    assert json.loads((checkpoint / "config.json").read_text())["auto_map"]["AutoModel"] == (
        "modeling_mqspn.MQSPNForGroundedNER"
    )

    tensors = {key: value for key, value in batch.items() if isinstance(value, torch.Tensor)}
    tensors["num_labels"] = torch.tensor(len(batch["labels"]))
    for b, label in enumerate(batch["labels"]):
        tensors.update({f"labels.{b}.{key}": label[key] for key in ("start", "end", "type", "regions")})
    save_file({key: value.contiguous() for key, value in tensors.items()}, tmp_path / "inputs.safetensors")
    (tmp_path / "remote.py").write_text(REMOTE_SCRIPT)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    environment = {
        key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")
    }
    environment.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "remote.py"), str(checkpoint), str(tmp_path / "inputs.safetensors"),
         str(tmp_path / "outputs.safetensors")],
        cwd=workdir,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["importable"] is False
    assert report["sys_modules"] == []
    assert report["model_module"].startswith("transformers_modules.")
    assert report["model_module"].endswith(".modeling_mqspn")
    assert report["vision_trainable"] is False

    remote = load_file(tmp_path / "outputs.safetensors")
    torch.testing.assert_close(remote["loss"], expected.loss, rtol=0, atol=0)
    for key in ("existence_logits", "start_logits", "end_logits", "region_logits"):
        torch.testing.assert_close(remote[key], getattr(expected, key), rtol=0, atol=0)
