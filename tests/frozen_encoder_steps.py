"""Frozen-text-encoder steps, two ways, on one process or under ``accelerate launch`` (DDP over gloo).

``drop``: the base behaviour — the whole model in backward, the text encoder's gradients reduced by DDP and
then dropped (``drop_gradients``). ``skip``: ``set_text_encoder_frozen`` — the encoder's parameters do not
require gradients while frozen (DDP built without them), so backward stops at its output; DDP is rebuilt
when it thaws. Both run ``FROZEN_STEPS`` frozen steps, then ``THAWED_STEPS`` with the encoder training,
each rank its own batch, the same dropout seeds. Writes ``{"losses", "parameters_digest", ...}`` per mode
and rank to ``OUT/rank<r>.json``; ``tests/test_speed_paths.py`` compares them (to 1e-5).

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 tests/frozen_encoder_steps.py OUT
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import make_batch, tiny_config  # noqa: E402

from modeling_mqspn import MQSPNForGroundedNER  # noqa: E402
from modeling_mqspn.tools.training import drop_gradients, make_adamw, parameter_groups, set_text_encoder_frozen  # noqa: E402

FROZEN_STEPS, THAWED_STEPS = 2, 2
WORDS, REGIONS, ENTITIES = [5, 3, 7, 4], [2, 0, 4, 1], [2, 0, 3, 1]


def run_mode(accelerator, mode):
    """Train a fresh tiny model (same init on every rank) ``FROZEN_STEPS + THAWED_STEPS`` steps; returns the
    losses, whether the frozen encoder's ``.grad`` stayed None after every frozen backward, and the final
    parameters (CPU, by name)."""
    torch.manual_seed(0)
    model = MQSPNForGroundedNER(tiny_config(fusion_dropout=0.1))
    model.train()
    groups = parameter_groups(model, 1e-2, None, 0.01)
    text = [p for group in groups if group["role"] == "text_encoder" for p in group["params"]]
    optimizer = make_adamw(groups, "for-loop")
    if mode == "skip":
        model = set_text_encoder_frozen(accelerator, model, text, True)
    model, optimizer = accelerator.prepare(model, optimizer)
    rank = accelerator.process_index
    losses, grad_none = [], []
    for step in range(FROZEN_STEPS + THAWED_STEPS):
        frozen = step < FROZEN_STEPS
        if mode == "skip":
            model = set_text_encoder_frozen(accelerator, model, text, frozen)
        batch = make_batch(accelerator.unwrap_model(model).config, WORDS, REGIONS, ENTITIES, seed=10 * step + rank)
        torch.manual_seed(1000 + 10 * step + rank)  # dropout masks: the same in both modes
        loss = model(**batch).loss
        accelerator.backward(loss)
        if frozen:
            grad_none.append(all(p.grad is None for p in text))
            drop_gradients(text)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    module = accelerator.unwrap_model(model)
    parameters = {name: p.detach().cpu().clone() for name, p in module.named_parameters()}
    return {"losses": losses, "frozen_grad_none": grad_none,
            "wrapper": type(model).__name__}, parameters


def main(out_dir):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    record = {"world_size": accelerator.num_processes}
    tensors = {}
    for mode in ("drop", "skip"):
        record[mode], parameters = run_mode(accelerator, mode)
        tensors[mode] = parameters
    names = sorted(tensors["drop"])
    record["max_parameter_difference"] = max(float((tensors["drop"][n] - tensors["skip"][n]).abs().max()) for n in names)
    text_names = [n for n in names if n.startswith("text_encoder.")]
    torch.manual_seed(0)
    initial = dict(MQSPNForGroundedNER(tiny_config(fusion_dropout=0.1)).named_parameters())
    record["text_encoder_changed"] = max(float((tensors["skip"][n] - initial[n].detach()).abs().max()) for n in text_names)
    # The ranks must hold the same weights (DDP averaged every gradient the optimiser used).
    flat = torch.cat([tensors["skip"][n].flatten() for n in names])
    gathered = accelerator.gather(flat[None])
    record["max_rank_difference"] = float((gathered - gathered[0]).abs().max())
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"rank{accelerator.process_index}.json"), "w", encoding="utf-8") as handle:
        json.dump(record, handle)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return record


if __name__ == "__main__":
    main(sys.argv[1])
