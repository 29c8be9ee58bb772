"""The contract between the processor, the model and the code that calls them (docs/ARCHITECTURE.md,
"Model inputs" and "Model outputs").

A processor output (or a collated training batch) holds three kinds of keys:

* `MODEL_INPUT_NAMES`: the tensors `MQSPNForGroundedNER.forward` computes with;
* `LABELS_NAME`: the per-tweet gold dicts, the loss's input;
* `METADATA_NAMES`: what `MQSPNProcessor.post_process_grounded_ner` needs to turn outputs into entities
  (pixel boxes, image sizes, words, character offsets). `forward` accepts and ignores them, so
  `model(**inputs)` works on a whole processor output, and any other keyword is an error.

`select_model_inputs` is the one place that picks the forward keywords out of such a mapping; the
processor, the pipeline, `examples/train.py` and the benchmarks all call it.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch

from .configuration_mqspn import BOUNDARY_ACTIVATIONS

__all__ = [
    "LABELS_NAME",
    "METADATA_NAMES",
    "MODEL_INPUT_NAMES",
    "boundary_activation_of",
    "boundary_probabilities",
    "head_mode_of",
    "masked_fill_logits",
    "masked_logit_value",
    "select_model_inputs",
]

MODEL_INPUT_NAMES = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "word_ids",
    "word_mask",
    "pixel_values",
    "region_features",
    "region_mask",
)
LABELS_NAME = "labels"
# Moved to a device with the inputs but never cast to another dtype (`MQSPNBatchFeature.to`), except
# the lists of strings, which do not move at all.
METADATA_NAMES = ("region_boxes", "image_sizes", "word_offsets", "words", "text")


def select_model_inputs(features: Mapping[str, Any], with_labels: bool = True) -> Dict[str, Any]:
    """The keyword arguments of `MQSPNForGroundedNER.forward` held by `features` (a processor output or
    a collated batch): the `MODEL_INPUT_NAMES` present, and `labels` when present and `with_labels`."""
    names = MODEL_INPUT_NAMES + ((LABELS_NAME,) if with_labels else ())
    return {key: features[key] for key in names if key in features}


def head_mode_of(layer: Mapping[str, Optional[Any]]) -> str:
    """`"existence"` or `"softmax"`: which classification logits a model output (or one layer's
    prediction dict) holds, `existence_logits` (B, u) or `class_logits` (B, u, p + 1)."""
    has_existence = layer.get("existence_logits") is not None
    has_class = layer.get("class_logits") is not None
    if has_existence == has_class:
        raise ValueError(
            "Model outputs must hold exactly one of 'existence_logits' (existence head) and "
            f"'class_logits' (softmax head); got existence_logits={'set' if has_existence else 'missing'}"
            f", class_logits={'set' if has_class else 'missing'}."
        )
    return "existence" if has_existence else "softmax"


def masked_logit_value(dtype):
    """The logit of a masked position: a large negative number, safe to add twice in any dtype."""
    return torch.finfo(dtype).min / 2


def masked_fill_logits(logits, mask):
    """Give masked positions (``mask`` False) the masked logit (``masked_logit_value``)."""
    return logits.masked_fill(~mask, masked_logit_value(logits.dtype))


def boundary_activation_of(config) -> str:
    """The config's ``boundary_activation``; ``"sigmoid"`` (the paper's) for a config or duck-typed object
    without one (the decoding accepts any object with the config's fields)."""
    return getattr(config, "boundary_activation", "sigmoid")


def boundary_probabilities(logits, activation: str = "sigmoid"):
    """P^s or P^e (B, u, n) from the span head's boundary logits: an independent sigmoid per word (the
    paper's Eq. 6, `"sigmoid"`) or a softmax over the tweet's words (`"softmax"`; padding words carry a
    large negative logit and get probability 0). The loss, the matching cost, the classification head and
    the decoding all read the boundaries through this one function."""
    if activation == "softmax":
        return logits.softmax(-1)
    if activation != "sigmoid":
        raise ValueError(f"boundary_activation must be one of {BOUNDARY_ACTIVATIONS}, got {activation!r}.")
    return logits.sigmoid()
