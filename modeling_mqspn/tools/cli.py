"""Checks shared by the command-line scripts (``examples/*.py``, ``processing/*.py``, the Space): each bad
argument is refused before any work with ONE line that names the argument and the fix (the scripts print
``error: <message>`` and exit with code 2, no traceback; docs/robustness.md "Workflows").

- ``check_model_path``: a local ``--model`` folder that does not exist (instead of huggingface_hub's
  "Repo id must be in the form ..." for a path such as ``runs/demo/best``);
- ``check_device``: ``--device`` spelt wrongly (``gpu0``) or naming CUDA on a machine without it;
- ``check_output_dir``: an output folder that is a file (found before computing, not after);
- ``check_input_dir``: a folder argument (``--xml_dir``, ``--images_dir``, ...) that does not exist;
- ``check_config_fields``: ``--model_config`` keys that are not ``MQSPNConfig`` fields, with the closest
  valid key (``difflib``);
- ``run_cli``: run a script's ``main`` so that these errors (and data errors) print one line, exit 2.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import sys
from typing import Callable, Iterable, Mapping, Optional, Sequence

__all__ = [
    "DEVICE",
    "REPO_ID",
    "UsageError",
    "check_config_fields",
    "check_device",
    "check_input_dir",
    "check_model_path",
    "check_output_dir",
    "closest",
    "config_fields",
    "is_repo_id",
    "run_cli",
]

# huggingface_hub's repo id rule: "name" or "namespace/name" of letters, digits, '-', '_', '.'.
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
DEVICE = re.compile(r"^(cpu|mps|meta|(cuda|xpu|npu)(:\d+)?|\d+|-1)$")


class UsageError(ValueError):
    """A bad command-line argument; the message is the one line to print."""


def is_repo_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hub repo id (``name`` or ``namespace/name``)."""
    return bool(REPO_ID.match(name)) and ".." not in name and not name.endswith(".git")


def check_model_path(path: str, flag: str = "--model") -> str:
    """``path`` when it is an existing folder or has the form of a Hub repo id; else ``UsageError`` saying
    the folder does not exist (a path with a leading ``.``, ``/``, ``~`` or two ``/`` can only be a folder)."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise UsageError(f"{flag} {path}: is a file, not a checkpoint folder (the folder holds config.json and model.safetensors)")
    if path.startswith((".", "/", "~")) or not is_repo_id(path):
        raise UsageError(f"{flag} {path}: the folder does not exist; give a checkpoint folder (e.g. runs/demo/best) "
                         "or a Hub id (namespace/name)")
    return path


def check_device(device: Optional[str], flag: str = "--device") -> Optional[str]:
    """``device`` when it names a device this machine has: ``cpu``, ``cuda``, ``cuda:N``, ``mps``, or a
    CUDA index; ``UsageError`` otherwise."""
    if device is None:
        return None
    text = str(device).strip()
    if not DEVICE.match(text):
        raise UsageError(f"{flag} {device!r}: not a device; write cpu, cuda, cuda:0, cuda:1, ... or mps")
    import torch

    if text.startswith("cuda") or text.isdigit():
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {device}: CUDA is not available on this machine (torch {torch.__version__}); "
                             "use --device cpu")
        index = int(text.split(":")[1]) if ":" in text else (int(text) if text.isdigit() else 0)
        if index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if text == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"{flag} mps: MPS is not available on this machine; use --device cpu")
    return text


def check_output_dir(path: str, flag: str = "--output_dir") -> str:
    """``path`` when it is a folder or can become one; ``UsageError`` when it (or a parent) is a file."""
    probe = os.path.abspath(path)
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.exists(probe) and not os.path.isdir(probe):
        which = "is a file" if probe == os.path.abspath(path) else f"is inside {probe}, which is a file"
        raise UsageError(f"{flag} {path}: {which}; give a folder (it is created when missing)")
    return path


def check_input_dir(path: Optional[str], flag: str) -> Optional[str]:
    """``path`` (or None) when it is an existing folder; ``UsageError`` naming the flag otherwise."""
    if path is None or os.path.isdir(path):
        return path
    what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
    raise UsageError(f"{flag} {path}: {what}; give an existing folder or leave {flag} out")


def closest(key: str, valid: Iterable[str]) -> Optional[str]:
    """The valid key closest to ``key`` (``difflib``), or None when none is close."""
    found = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
    return found[0] if found else None


def config_fields() -> Sequence[str]:
    """The keys ``MQSPNConfig`` accepts: its ``__init__`` parameters."""
    from ..configuration_mqspn import MQSPNConfig

    parameters = inspect.signature(MQSPNConfig.__init__).parameters
    return sorted(name for name, p in parameters.items() if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))


def check_config_fields(fields: Mapping[str, object], flag: str = "--model_config") -> None:
    """``UsageError`` for the first key of ``fields`` that is not an ``MQSPNConfig`` field, naming the
    closest valid one (``{"num_querys": 40}`` → "did you mean 'num_queries'?")."""
    if not isinstance(fields, Mapping):
        raise UsageError(f"{flag}: expected a JSON object of MQSPNConfig fields, got {type(fields).__name__}")
    valid = config_fields()
    for key in fields:
        if key not in valid:
            near = closest(key, valid)
            hint = f"did you mean {near!r}?" if near else f"the fields are {list(valid)}"
            raise UsageError(f"{flag}: {key!r} is not an MQSPNConfig field; {hint}")


def run_cli(main: Callable[..., int], argv=None, errors=(UsageError,)) -> int:
    """``main(argv)``; an exception of ``errors`` prints ``error: <message>`` (one line) and gives 2."""
    try:
        result = main(argv)
        return result if isinstance(result, int) else 0
    except errors as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
