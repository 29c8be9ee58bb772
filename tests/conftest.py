"""Shared helpers for the tests: tiny MQSPN configurations built in code, synthetic batches in the model's
input format (docs/ARCHITECTURE.md, "Model inputs"), and running a script (``accelerate launch`` included) as a
subprocess or importing it as a module. Test files import them with `from conftest import ...`."""

import importlib.util
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, CLIPVisionConfig

from modeling_mqspn import MQSPNConfig

# The tests' models are tiny: intra-op threads gain nothing, and on a busy shared machine OpenMP workers
# waiting for a core made one forward/backward ~100x slower (10 s instead of 0.1 s) here.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_script(relative_path, name):
    """The repository script at ``relative_path`` (e.g. ``"examples/train.py"``) imported as a fresh module
    called ``name``, so that a test can call its ``main(argv)`` in this process."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_VOCAB_SIZE = 99
CLS_ID, SEP_ID, PAD_ID = 2, 3, 0
TINY_IMAGE_SIZE = 32


def tiny_text_config(**overrides):
    """A two-layer BERT of width 32."""
    fields = dict(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        pad_token_id=PAD_ID,
    )
    fields.update(overrides)
    return BertConfig(**fields)


def tiny_vision_config(**overrides):
    """A one-layer CLIP vision tower of width 24 on 32×32 crops (4 patches)."""
    fields = dict(
        hidden_size=24,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE,
        patch_size=16,
    )
    fields.update(overrides)
    return CLIPVisionConfig(**fields)


def tiny_config(**overrides):
    """A tiny MQSPNConfig (h = 32, D_v = 24, u = 8 queries over the 4 default types, k = 4, L = 2); every
    field can be overridden by keyword."""
    fields = dict(
        text_config=tiny_text_config(),
        vision_config=tiny_vision_config(),
        num_queries=8,
        max_regions=4,
        num_fusion_layers=2,
        fusion_num_heads=4,
        fusion_intermediate_size=48,
    )
    fields.update(overrides)
    return MQSPNConfig(**fields)


def make_batch(config, word_counts, region_counts, entity_counts, seed=0, pixels=False):
    """A synthetic batch: tweet b has word_counts[b] words of 1-3 random sub-words each, region_counts[b]
    proposals (features, or 32×32 crops with `pixels=True`) and entity_counts[b] gold entities with random
    non-overlapping spans, types balanced so each type has enough queries, and random regions (column 0 when
    the entity is not groundable). Returns the forward keyword arguments, labels included."""
    generator = torch.Generator().manual_seed(seed)
    batch_size = len(word_counts)
    num_types = len(config.entity_types)
    token_rows, word_id_rows = [], []
    for count in word_counts:
        tokens, word_ids = [CLS_ID], [-1]
        for word in range(count):
            pieces = int(torch.randint(1, 4, (1,), generator=generator))
            tokens += torch.randint(5, config.text_config.vocab_size, (pieces,), generator=generator).tolist()
            word_ids += [word] * pieces
        token_rows.append(tokens + [SEP_ID])
        word_id_rows.append(word_ids + [-1])
    seq_len = max(len(row) for row in token_rows)
    num_words = max(word_counts)
    num_regions = max(region_counts)
    input_ids = torch.full((batch_size, seq_len), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros(batch_size, seq_len, dtype=torch.long)
    word_ids = torch.full((batch_size, seq_len), -1, dtype=torch.long)
    word_mask = torch.zeros(batch_size, num_words, dtype=torch.bool)
    region_mask = torch.zeros(batch_size, num_regions, dtype=torch.bool)
    labels = []
    for b in range(batch_size):
        length = len(token_rows[b])
        input_ids[b, :length] = torch.tensor(token_rows[b])
        attention_mask[b, :length] = 1
        word_ids[b, :length] = torch.tensor(word_id_rows[b])
        word_mask[b, : word_counts[b]] = True
        region_mask[b, : region_counts[b]] = True
        # Non-overlapping spans: cut the words into entity_counts[b] slots of at least one word.
        m = entity_counts[b]
        assert m <= word_counts[b], "a tweet needs at least one word per entity"
        cuts = sorted(torch.randperm(word_counts[b] - 1, generator=generator)[: m - 1].add(1).tolist()) if m else []
        bounds = [0] + cuts + [word_counts[b]]
        starts, ends = [], []
        for j in range(m):
            low, high = bounds[j], bounds[j + 1] - 1
            start = int(torch.randint(low, high + 1, (1,), generator=generator))
            starts.append(start)
            ends.append(min(high, start + int(torch.randint(0, 2, (1,), generator=generator))))
        regions = torch.zeros(m, num_regions + 1, dtype=torch.bool)
        for j in range(m):
            if region_counts[b] and j % 2 == 0:
                regions[j, 1 + int(torch.randint(0, region_counts[b], (1,), generator=generator))] = True
            else:
                regions[j, 0] = True
        labels.append(
            {
                "id": f"tweet-{b}",
                "start": torch.tensor(starts, dtype=torch.long),
                "end": torch.tensor(ends, dtype=torch.long),
                "type": torch.arange(m, dtype=torch.long) % num_types,
                "regions": regions,
            }
        )
    batch = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        word_ids=word_ids,
        word_mask=word_mask,
        region_mask=region_mask,
        labels=labels,
    )
    if pixels:
        batch["pixel_values"] = torch.randn(
            batch_size, num_regions, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator
        )
    else:
        batch["region_features"] = torch.randn(
            batch_size, num_regions, config.vision_config.hidden_size, generator=generator
        )
    return batch


def free_port():
    """A TCP port nobody listens on now, for a data-parallel rendezvous (a fixed one can still be held by an
    earlier run's process)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def descendants(pid):
    """The process ids of every process below ``pid`` (read from /proc; empty where there is none)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found.extend(below)
        todo.extend(below)
    return found


def run_process(command, cwd, env, timeout):
    """``subprocess.run(command, capture_output=True, text=True)`` that cleans up after itself. Past ``timeout``
    seconds every process it started is killed (``accelerate launch`` starts each worker in a session of its
    own, so killing the launcher alone leaves them running and holding their port) and the test fails with
    the tails of both outputs."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [process.pid, *descendants(process.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(map(str, command))}\nstill running after {timeout} s, killed\n"
                    f"stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-6000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
