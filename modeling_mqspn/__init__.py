"""MQSPN (Tang et al., AAAI 2025) for grounded multimodal named entity recognition, the Hugging Face way.

Two parts, by what ships (docs/ARCHITECTURE.md):

* the flat modules of this folder, `SHIPPED_MODULES`, are what a checkpoint carries for
  `trust_remote_code`: they import only each other (relatively) and the packages a Hub user has;
* `modeling_mqspn.tools` (data readers, the official metric, training utilities, the region-feature
  cache, the demo-data generator, the checkpoint export) never ships and is never imported by them.

Importing this package imports the config, the model and the processor and registers them with the
Auto classes, as a transformers model package does. The other public names are loaded on first use
(`modeling_mqspn.load_twitter_gmner` imports `tools.data`, `modeling_mqspn.GroundedNERPipeline` the
pipeline module, which registers the `grounded-ner` task), so `import modeling_mqspn` pulls in no
training dependency.
"""

import importlib
from typing import TYPE_CHECKING

from transformers import AutoConfig, AutoModel

from .configuration_mqspn import MQSPNConfig
from .modeling_mqspn import MQSPNForGroundedNER, MQSPNOutput
from .processing_mqspn import MQSPNProcessor

# The remote-code modules a checkpoint carries, the one declaration of them (tools/export.py writes exactly
# these next to the weights; tests/test_export.py checks the set against an export and the imports).
SHIPPED_MODULES = (
    "box_ops.py",
    "configuration_mqspn.py",
    "decoding_mqspn.py",
    "image_utils.py",
    "interface_mqspn.py",
    "matching_mqspn.py",
    "modeling_mqspn.py",
    "pipeline_mqspn.py",
    "processing_mqspn.py",
    "proposers_mqspn.py",
    "schema_mqspn.py",
    "vinvl_mqspn.py",
    "visualize.py",
)

# `save_pretrained` then writes `auto_map` and copies the defining modules, so that
# `AutoModel.from_pretrained(dir, trust_remote_code=True)` works without this package.
MQSPNConfig.register_for_auto_class()
MQSPNForGroundedNER.register_for_auto_class("AutoModel")
MQSPNProcessor.register_for_auto_class("AutoProcessor")
# With the package installed, the Auto classes resolve model_type "mqspn" without remote code.
AutoConfig.register("mqspn", MQSPNConfig, exist_ok=True)
AutoModel.register(MQSPNConfig, MQSPNForGroundedNER, exist_ok=True)

# name -> (module, attribute), imported on first access.
_LAZY = {
    "GROUNDED_NER_TASK": (".pipeline_mqspn", "TASK"),
    "GroundedNERPipeline": (".pipeline_mqspn", "GroundedNERPipeline"),
    "get_proposer": (".proposers_mqspn", "get_proposer"),
    "load_vinvl_proposals": (".vinvl_mqspn", "load_vinvl_proposals"),
    "evaluate_grounded_ner": (".tools.metrics", "evaluate_grounded_ner"),
    "load_jsonl": (".tools.data", "load_jsonl"),
    "load_twitter_fmnerg": (".tools.data", "load_twitter_fmnerg"),
    "load_twitter_gmner": (".tools.data", "load_twitter_gmner"),
    "write_references_jsonl": (".tools.data", "write_references_jsonl"),
}

__all__ = ["MQSPNConfig", "MQSPNForGroundedNER", "MQSPNOutput", "MQSPNProcessor", "SHIPPED_MODULES", *_LAZY]

if TYPE_CHECKING:
    from .pipeline_mqspn import TASK as GROUNDED_NER_TASK  # noqa: F401
    from .pipeline_mqspn import GroundedNERPipeline  # noqa: F401
    from .proposers_mqspn import get_proposer  # noqa: F401
    from .tools.data import load_jsonl, load_twitter_fmnerg, load_twitter_gmner, write_references_jsonl  # noqa: F401
    from .tools.metrics import evaluate_grounded_ner  # noqa: F401
    from .vinvl_mqspn import load_vinvl_proposals  # noqa: F401


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module, __name__), attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
