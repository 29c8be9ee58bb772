"""Write a checkpoint folder that runs without this package: weights (safetensors), the config with
`auto_map` and `custom_pipelines`, the processor, and exactly the remote-code modules of
`modeling_mqspn.SHIPPED_MODULES` (docs/ARCHITECTURE.md, "What ships").

`examples/train.py` saves its `best/` model this way and `examples/push_to_hub.py` builds the Hub
folder on top of it, so `pipeline(model=folder, trust_remote_code=True)` finds the `grounded-ner` task
and its code in either."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import List, Sequence

__all__ = ["PACKAGE_DIR", "save_checkpoint", "shipped_code_in"]

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def shipped_code_in(folder) -> List[str]:
    """The Python modules in `folder`, sorted by name."""
    return sorted(path.name for path in Path(folder).glob("*.py"))


def save_checkpoint(model, processor, folder, extra_files: Sequence[str] = ()) -> List[str]:
    """Save `model` (an `MQSPNForGroundedNER`) and `processor` to `folder` with the shipped modules and
    the pipeline entry in the config; `extra_files` are other `.py` files the caller adds next to them
    (the Hub export's `handler.py`). Returns the module names written. Raises `RuntimeError` when the
    folder then holds another module (a folder reused from an older export, say)."""
    from transformers.pipelines import PIPELINE_REGISTRY

    from .. import SHIPPED_MODULES
    from ..pipeline_mqspn import TASK

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # What `Pipeline.save_pretrained` writes into the config, without building a pipeline (which would move a
    # model in training to another device).
    info = dict(PIPELINE_REGISTRY.supported_tasks[TASK])
    info["impl"] = f"pipeline_mqspn.{info['impl'].__name__}"
    info["pt"] = [cls.__name__ for cls in info["pt"]]
    info.pop("tf", None)
    model.config.custom_pipelines = {TASK: info}
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    for name in SHIPPED_MODULES:
        shutil.copyfile(PACKAGE_DIR / name, folder / name)
    written = shipped_code_in(folder)
    unexpected = sorted(set(written) - set(SHIPPED_MODULES) - {Path(name).name for name in extra_files})
    if unexpected:
        raise RuntimeError(f"{folder}: holds modules that are not part of the checkpoint's code: {unexpected}; "
                           "save into a new folder")
    return [name for name in written if name in SHIPPED_MODULES]
