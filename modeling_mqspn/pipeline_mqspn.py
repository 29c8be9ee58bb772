"""The ``grounded-ner`` pipeline: tweet + image in, grounded entities out (MODEL.md §6-7).

    from transformers import pipeline
    ner = pipeline("grounded-ner", model="path/or/hub-id", trust_remote_code=True)
    ner({"text": "Messi lands in Paris", "image": "photo.jpg"})
    # [{"text": "Messi", "type": "PER", "start": 0, "end": 0, "char_start": 0, "char_end": 5,
    #   "box": [x1, y1, x2, y2], "score": ..., "region_score": ...}, ...]

An input is a dict with ``"text"`` (a raw string; predictions carry character offsets into it) or
``"words"`` (a pre-split tweet), ``"image"`` (path, URL, base64 string, PIL image, HWC uint8 array, or
None for text only) and optionally ``"boxes"`` (the candidate regions, pixel ``[x1, y1, x2, y2]`` best
first). Without ``"boxes"`` the pipeline's ``proposer`` finds them (``proposers_mqspn``): a proposer
object or name given to ``pipeline(..., proposer=...)`` or per call; by default OpenCV selective search
when ``opencv-contrib-python-headless`` is installed. A list of inputs gives a list of results and
runs in batches of ``batch_size``.

The output per input is the list of entity dicts of ``MQSPNProcessor.post_process_grounded_ner``; a
``threshold`` argument overrides the config's existence threshold (paper Eq. 8's P^c cut).

The module registers the task (``PIPELINE_REGISTRY``), so ``pipe.save_pretrained`` writes it into the
config's ``custom_pipelines`` and ``pipeline(model=folder, trust_remote_code=True)`` finds it.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .image_utils import load_rgb_image
from .proposers_mqspn import get_proposer, selective_search_available

TASK = "grounded-ner"
INPUT_KEYS = ("id", "text", "words", "image", "boxes")


class GroundedNERPipeline(Pipeline):
    """Grounded multimodal NER with MQSPN: see the module docstring for inputs and outputs.

    Args (besides the `Pipeline` ones):
        proposer: where an image's candidate regions come from when an input has no ``"boxes"``: an
            object with ``propose(image) -> boxes`` or a name of ``proposers_mqspn.get_proposer``
            (``"selective-search"``, ``"detector"`` needs ``proposer_kwargs={"model": ...}``,
            ``"vinvl"`` needs ``proposer_kwargs={"directory": ...}``). Default: selective search when
            OpenCV contrib is installed, else inputs with an image must carry ``"boxes"``.
        proposer_kwargs: arguments of the named proposer.
        threshold: existence threshold (default: the model config's ``existence_threshold``).
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False

    def _sanitize_parameters(self, proposer=None, proposer_kwargs=None, threshold=None):
        preprocess, forward = {}, {}
        if proposer is not None or proposer_kwargs is not None:
            if proposer is None:
                raise ValueError("proposer_kwargs given without a proposer name")
            preprocess["proposer"] = get_proposer(proposer, top_k=self.model.config.max_regions, **(proposer_kwargs or {}))
        if threshold is not None:
            if not 0.0 <= float(threshold) <= 1.0:
                raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
            forward["threshold"] = float(threshold)
        return preprocess, forward, {}

    def _default_proposer(self):
        if getattr(self, "_selective_search", None) is None:
            if not selective_search_available():
                return None
            self._selective_search = get_proposer("selective-search", top_k=self.model.config.max_regions)
        return self._selective_search

    def preprocess(self, inputs: Dict[str, Any], proposer=None) -> Dict[str, Any]:
        """Validate one input, read its image and find its candidate regions."""
        if not isinstance(inputs, dict):
            raise TypeError(
                f"the {TASK} pipeline takes a dict {{'text' or 'words', 'image', optional 'boxes'}} or a list of "
                f"them, got {type(inputs).__name__}"
            )
        name = repr(inputs["id"]) if "id" in inputs else "input"
        unknown = sorted(set(inputs) - set(INPUT_KEYS))
        if unknown:
            raise ValueError(f"{name}: unknown keys {unknown}; an input has {INPUT_KEYS}")
        if ("text" in inputs) == ("words" in inputs):
            raise ValueError(f"{name}: give exactly one of 'text' (a string) or 'words' (a list of words)")
        if "text" in inputs and not isinstance(inputs["text"], str):
            raise TypeError(f"{name}: 'text' must be a string, got {type(inputs['text']).__name__}")
        if "words" in inputs and (isinstance(inputs["words"], str) or not all(isinstance(w, str) for w in inputs["words"])):
            raise TypeError(f"{name}: 'words' must be a list of strings")

        example = {key: inputs[key] for key in ("id", "text", "words") if key in inputs}
        source = inputs.get("image")
        if source is None:
            if inputs.get("boxes"):
                raise ValueError(f"{name}: 'boxes' given without an 'image'")
            example["image"], example["boxes"] = None, []
            return {"examples": example}
        try:
            image = load_rgb_image(source)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{name}: {error}") from None
        if inputs.get("boxes") is not None:
            boxes = inputs["boxes"]
        else:
            proposer = proposer if proposer is not None else self._default_proposer()
            if proposer is None:
                raise ValueError(
                    f"{name} has an image but no 'boxes', and no region proposer is available: give 'boxes', "
                    "pass proposer='detector' (with proposer_kwargs={'model': ...}) or 'vinvl', or install "
                    "opencv-contrib-python-headless for the selective-search fallback"
                )
            # A path goes to the proposer as given: the VinVL proposer finds its file by the image's name.
            boxes = proposer.propose(source if isinstance(source, (str, os.PathLike)) and os.path.isfile(source) else image)
        example["image"], example["boxes"] = image, boxes
        return {"examples": example}

    def _forward(self, model_inputs: Dict[str, Any], threshold: Optional[float] = None) -> Dict[str, Any]:
        """Process, run and decode a batch; raw-string and pre-split inputs go through the processor
        separately (it takes one kind per call)."""
        examples = model_inputs["examples"]
        if isinstance(examples, dict):  # batch_size 1: transformers passes the single preprocess output through
            examples = [examples]
        results: List[Optional[Dict[str, Any]]] = [None] * len(examples)
        for kind in ("text", "words"):
            chosen = [index for index, example in enumerate(examples) if kind in example]
            if not chosen:
                continue
            group = [examples[index] for index in chosen]
            has_image = [example["image"] is not None for example in group]
            encoded = self.processor(
                **{kind: [example[kind] for example in group]},
                images=[example["image"] for example in group] if any(has_image) else None,
                boxes=[example["boxes"] for example in group],
                ids=[str(example.get("id", index)) for example, index in zip(group, chosen)],
            ).to(self.device)
            model_kwargs = {key: encoded[key] for key in self.processor.model_input_names if key in encoded}
            outputs = self.model(**model_kwargs)
            entities = self.processor.post_process_grounded_ner(
                outputs, encoded, threshold=threshold, config=self.model.config
            )
            for index, found in zip(chosen, entities):
                results[index] = {"entities": found}
        return {"results": results}

    def postprocess(self, model_outputs: Dict[str, Any]) -> List[Dict[str, Any]]:
        result = model_outputs["results"]
        if isinstance(result, list):  # batch_size 1: _forward's batch of one is not unbatched
            (result,) = result
        return result["entities"]


PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=GroundedNERPipeline, pt_model=AutoModel, type="multimodal")

__all__ = ["GroundedNERPipeline", "TASK"]
