"""MQSPN (Tang et al., AAAI 2025) for grounded multimodal named entity recognition, the Hugging Face way."""

from transformers import AutoConfig, AutoModel

from .configuration_mqspn import MQSPNConfig
from .modeling_mqspn import MQSPNForGroundedNER, MQSPNOutput

# `save_pretrained` then writes `auto_map` and copies the defining modules, so that
# `AutoModel.from_pretrained(dir, trust_remote_code=True)` works without this package.
MQSPNConfig.register_for_auto_class()
MQSPNForGroundedNER.register_for_auto_class("AutoModel")
# With the package installed, the Auto classes resolve model_type "mqspn" without remote code.
AutoConfig.register("mqspn", MQSPNConfig, exist_ok=True)
AutoModel.register(MQSPNConfig, MQSPNForGroundedNER, exist_ok=True)

__all__ = ["MQSPNConfig", "MQSPNForGroundedNER", "MQSPNOutput"]

from .processing_mqspn import MQSPNProcessor  # noqa: E402

# `AutoProcessor.from_pretrained(dir, trust_remote_code=True)` loads the processor saved with a checkpoint
# from the modules copied into it (with the package installed, `MQSPNProcessor.from_pretrained(dir)` works too).
MQSPNProcessor.register_for_auto_class("AutoProcessor")
__all__ += ["MQSPNProcessor"]

# Evaluation and data. data_mqspn imports `datasets` only inside its readers, so importing it here
# costs nothing for users of the model alone.
from .data_mqspn import load_jsonl, load_twitter_fmnerg, load_twitter_gmner, write_references_jsonl  # noqa: E402
from .metrics_mqspn import evaluate_grounded_ner  # noqa: E402
from .vinvl_mqspn import load_vinvl_proposals  # noqa: E402

__all__ += [
    "evaluate_grounded_ner",
    "load_jsonl",
    "load_twitter_fmnerg",
    "load_twitter_gmner",
    "load_vinvl_proposals",
    "write_references_jsonl",
]

# Importing the pipeline module registers the `grounded-ner` task: `pipeline("grounded-ner", model=...)`.
from .pipeline_mqspn import TASK as GROUNDED_NER_TASK  # noqa: E402
from .pipeline_mqspn import GroundedNERPipeline  # noqa: E402
from .proposers_mqspn import get_proposer  # noqa: E402

__all__ += ["GROUNDED_NER_TASK", "GroundedNERPipeline", "get_proposer"]
