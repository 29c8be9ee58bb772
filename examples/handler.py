"""Inference Endpoints handler of an MQSPN checkpoint (copied into the exported folder as `handler.py`
by `examples/push_to_hub.py`).

The endpoint loads the checkpoint's own code (`trust_remote_code`): the `grounded-ner` pipeline that
`config.json`'s `custom_pipelines` names, the model and the processor. It needs nothing of this
repository besides the checkpoint folder; `requirements.txt` beside it lists the extra packages.

Request body (JSON)::

    {"inputs": {"text": "Messi lands in Paris", "image": "<base64 JPEG/PNG, or an http(s) URL>",
                "boxes": [[x1, y1, x2, y2], ...]},          # boxes optional
     "parameters": {"threshold": 0.5}}                       # optional

`inputs` may also be a list of such objects, and `"words": [...]` may replace `"text"`. Without
`"boxes"` the regions come from OpenCV selective search (installed by `requirements.txt`).

Response: for one input, the list of its entities `{"text", "type", "start", "end", "char_start",
"char_end", "box": [x1, y1, x2, y2] | null, "score", "region_score"}`; for a list, one list per input.
"""

from typing import Any, Dict, List

from transformers import pipeline

PARAMETERS = ("threshold", "batch_size")


class EndpointHandler:
    def __init__(self, path: str = ""):
        self.pipeline = pipeline(model=path or ".", trust_remote_code=True)

    def __call__(self, data: Dict[str, Any]) -> List[Any]:
        if "inputs" not in data:
            raise ValueError("the request body needs an 'inputs' object: {'text' or 'words', 'image', optional 'boxes'}")
        parameters = dict(data.get("parameters") or {})
        unknown = sorted(set(parameters) - set(PARAMETERS))
        if unknown:
            raise ValueError(f"unknown parameters {unknown}; this endpoint takes {list(PARAMETERS)}")
        return self.pipeline(data["inputs"], **parameters)
