"""The ``grounded-ner`` pipeline: tweet + image in, grounded entities out (docs/DESIGN.md §6-7).

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
``threshold`` argument overrides the config's decision threshold (``existence_threshold``, paper Eq. 8's P^c
cut, or ``softmax_threshold`` for the softmax head; train.py saves the one it chose on dev). An input
without any word (empty or whitespace-only text) has no entity: ``[]``.

Bad inputs. A single bad input raises its error (``TypeError`` / ``ValueError`` naming the input's
``"id"``). In a list of inputs, a bad one does not fail the others: its output is
``{"error": "<ExceptionType>: <message>"}`` (plus its ``"id"`` when it has one) and every good input
gets its entities as usual.

The module registers the task (``PIPELINE_REGISTRY``), so ``pipe.save_pretrained`` writes it into the
config's ``custom_pipelines`` and ``pipeline(model=folder, trust_remote_code=True)`` finds it.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .image_utils import load_rgb_image
from .interface_mqspn import select_model_inputs
from .processing_mqspn import split_words
from .proposers_mqspn import get_proposer, selective_search_available

__all__ = ["GroundedNERPipeline", "INPUT_KEYS", "TASK"]

TASK = "grounded-ner"
INPUT_KEYS = ("id", "text", "words", "image", "boxes")


class GroundedNERPipeline(Pipeline):
    """Grounded multimodal NER with MQSPN: see the module docstring for inputs and outputs.

    Args (besides the `Pipeline` ones):
        proposer: where an image's candidate regions come from when an input has no ``"boxes"``: an
            object with ``propose(image) -> boxes`` or a name of ``proposers_mqspn.get_proposer``
            (``"selective-search"``, ``"detector"`` needs ``proposer_kwargs={"model": ...}``,
            ``"vinvl"`` needs ``proposer_kwargs={"directory": ...}``, ``"owlv2"`` and ``"grounding-dino"``
            need ``{"model": ...}``; Grounding DINO is prompted with the model's ``type_verbalizers``
            unless ``prompt`` or ``type_words`` is given). Default: selective search when
            OpenCV contrib is installed, else inputs with an image must carry ``"boxes"``.
        proposer_kwargs: arguments of the named proposer.
        threshold: decision threshold (default: the model config's ``existence_threshold``, or its
            ``softmax_threshold`` for the softmax head).
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
            proposer_kwargs = dict(proposer_kwargs or {})
            if proposer == "grounding-dino" and "prompt" not in proposer_kwargs:
                # The open-vocabulary detector is prompted with this model's own type words.
                proposer_kwargs.setdefault("type_words", self.model.config.type_verbalizers)
            preprocess["proposer"] = get_proposer(proposer, top_k=self.model.config.max_regions, **proposer_kwargs)
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

    def run_single(self, inputs, preprocess_params, forward_params, postprocess_params):
        """One input (not a list): a bad input raises its error instead of returning it."""
        model_inputs = self.preprocess(inputs, **preprocess_params)
        if "error" in model_inputs["examples"]:
            raise model_inputs["examples"]["error"]
        model_outputs = self.forward(model_inputs, **forward_params)
        (result,) = model_outputs["results"]
        if "error" in result:
            raise result["error"]
        return self.postprocess(model_outputs, **postprocess_params)

    def preprocess(self, inputs: Dict[str, Any], proposer=None) -> Dict[str, Any]:
        """Validate one input, read its image and find its candidate regions; a bad input's error is
        kept as ``{"error": exception}`` so that the other inputs of a list still run."""
        try:
            return {"examples": self._prepare(inputs, proposer)}
        except (ValueError, TypeError, OSError) as error:
            failed = {"error": error}
            if isinstance(inputs, dict) and "id" in inputs:
                failed["id"] = inputs["id"]
            return {"examples": failed}

    def _prepare(self, inputs: Dict[str, Any], proposer=None) -> Dict[str, Any]:
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
            return example
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
        return example

    def _forward(self, model_inputs: Dict[str, Any], threshold: Optional[float] = None) -> Dict[str, Any]:
        """Process, run and decode a batch; raw-string and pre-split inputs go through the processor
        separately (it takes one kind per call). Inputs that failed in ``preprocess`` keep their error;
        inputs without a word get no entity."""
        examples = model_inputs["examples"]
        if isinstance(examples, dict):  # batch_size 1: transformers passes the single preprocess output through
            examples = [examples]
        results: List[Optional[Dict[str, Any]]] = [None] * len(examples)
        for index, example in enumerate(examples):
            if "error" in example:
                results[index] = {"error": example["error"], **({"id": example["id"]} if "id" in example else {})}
            elif not (split_words(example["text"])[0] if "text" in example else example["words"]):
                results[index] = {"entities": []}
        for kind in ("text", "words"):
            chosen = [index for index, example in enumerate(examples) if kind in example and results[index] is None]
            if not chosen:
                continue
            try:
                found = self._run_group(kind, [examples[index] for index in chosen], chosen, threshold)
            except (ValueError, TypeError) as error:
                if len(chosen) == 1:
                    found = [error]
                else:  # one bad tweet must not fail the batch: run them one by one, each keeping its error
                    found = []
                    for index in chosen:
                        try:
                            found += self._run_group(kind, [examples[index]], [index], threshold)
                        except (ValueError, TypeError) as item_error:
                            found.append(item_error)
            for index, entities in zip(chosen, found):
                if isinstance(entities, Exception):
                    results[index] = {"error": entities, **({"id": examples[index]["id"]} if "id" in examples[index] else {})}
                else:
                    results[index] = {"entities": entities}
        return {"results": results}

    def _run_group(self, kind: str, group: List[Dict[str, Any]], positions: List[int], threshold) -> List[list]:
        """Process, run and decode inputs of one kind together → their entity lists."""
        has_image = [example["image"] is not None for example in group]
        encoded = self.processor(
            **{kind: [example[kind] for example in group]},
            images=[example["image"] for example in group] if any(has_image) else None,
            boxes=[example["boxes"] for example in group],
            ids=[str(example.get("id", position)) for example, position in zip(group, positions)],
            max_length=self._max_length(),
        ).to(self.device)
        outputs = self.model(**select_model_inputs(encoded, with_labels=False))
        return self.processor.post_process_grounded_ner(outputs, encoded, threshold=threshold, config=self.model.config)

    def _max_length(self) -> int:
        """Sub-words per tweet: the processor's limit, or the text encoder's positions when fewer, so a
        long tweet is truncated (with the processor's warning) instead of crashing the encoder."""
        positions = getattr(self.model.config.text_config, "max_position_embeddings", None)
        return self.processor.max_length if positions is None else min(self.processor.max_length, int(positions))

    def postprocess(self, model_outputs: Dict[str, Any]):
        result = model_outputs["results"]
        if isinstance(result, list):  # batch_size 1: _forward's batch of one is not unbatched
            (result,) = result
        if "error" in result:
            error = result["error"]
            return {**({"id": result["id"]} if "id" in result else {}), "error": f"{type(error).__name__}: {error}"}
        return result["entities"]


PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=GroundedNERPipeline, pt_model=AutoModel, type="multimodal")
