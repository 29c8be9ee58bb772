"""Gradio Space for an MQSPN checkpoint: upload a photo, type a tweet, and see its grounded entities —
highlighted in the tweet, listed in a table, and boxed in the photo.

It stands in for the Hub's inference widget, which does not run models that need custom code. Everything
comes from the checkpoint (`trust_remote_code`): the `grounded-ner` pipeline and `visualize.draw_entities`,
so the Space needs only `requirements.txt`, not this repository.

    MQSPN_MODEL=you/mqspn-twitter-gmner python app.py      # a Hub id, or
    python app.py --model path/to/exported/folder           # a folder written by examples/push_to_hub.py

On a Space, set the variable `MQSPN_MODEL`. Gradio's own variables (`GRADIO_SERVER_NAME`,
`GRADIO_SERVER_PORT`) choose where it listens. Candidate regions come from OpenCV selective search
(`opencv-contrib-python-headless` in requirements.txt).
"""

import argparse
import os
import re
import sys
from typing import List, Tuple

import gradio as gr
from transformers import pipeline
from transformers.dynamic_module_utils import get_class_from_dynamic_module

TABLE_HEADERS = ["entity", "type", "box (x1, y1, x2, y2)", "score"]


def highlight(text: str, entities: List[dict]) -> List[Tuple[str, str]]:
    """The tweet cut into `(piece, type or None)` for `gr.HighlightedText`, entities in character order."""
    pieces, cursor = [], 0
    for entity in sorted(entities, key=lambda entity: entity["char_start"]):
        if entity["char_start"] > cursor:
            pieces.append((text[cursor : entity["char_start"]], None))
        pieces.append((text[entity["char_start"] : entity["char_end"]], entity["type"]))
        cursor = entity["char_end"]
    if cursor < len(text):
        pieces.append((text[cursor:], None))
    return pieces


def table_rows(entities: List[dict]) -> List[list]:
    """One row per entity: its text, type, box (or "not in the image") and score."""
    return [
        [
            entity["text"],
            entity["type"],
            ", ".join(f"{v:.0f}" for v in entity["box"]) if entity["box"] is not None else "not in the image",
            round(entity["score"], 3),
        ]
        for entity in entities
    ]


def color_map(entity_types: List[str], type_color) -> dict:
    """`{type: "#rrggbb"}` from the checkpoint's `visualize.type_color`: every type keeps one colour, the
    same in the highlighted tweet as in the annotated photo and the PNGs of examples/predict.py."""
    return {entity_type: "#%02x%02x%02x" % tuple(type_color(entity_type)) for entity_type in entity_types}


def check_model(model_id: str) -> str:
    """`model_id` when it is a folder or has the form of a Hub id; else SystemExit(one line, code 2) saying
    the folder does not exist (instead of huggingface_hub's "Repo id must be in the form ...")."""
    if os.path.isdir(model_id):
        return model_id
    hub_id = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?", model_id)
    if os.path.exists(model_id) or not hub_id or model_id.startswith((".", "/", "~")):
        print(f"error: --model {model_id}: the folder does not exist (or is a file); give an exported checkpoint "
              "folder or a Hub id (namespace/name)", file=sys.stderr)
        raise SystemExit(2)
    return model_id


def build_demo(model_id: str) -> gr.Blocks:
    """The Blocks app around the checkpoint `model_id` (a folder or a Hub id)."""
    ner = pipeline(model=model_id, trust_remote_code=True)
    draw_entities = get_class_from_dynamic_module("visualize.draw_entities", model_id)
    type_color = get_class_from_dynamic_module("visualize.type_color", model_id)
    colors = color_map(list(ner.model.config.entity_types), type_color)
    config = ner.model.config
    # the threshold calibrated on dev when the checkpoint was trained (best/config.json); the softmax head's
    # is softmax_threshold (None: every non-empty argmax, a threshold of 0)
    if config.head_mode == "existence":
        default_threshold = float(config.existence_threshold)
    else:
        default_threshold = float(getattr(config, "softmax_threshold", None) or 0.0)

    def predict(image, text, threshold):
        if not text or not text.strip():
            raise gr.Error("Type the tweet first.")
        inputs = {"text": text} if image is None else {"text": text, "image": image}
        entities = ner(inputs, threshold=threshold)
        annotated = draw_entities(image, entities) if image is not None else None
        return highlight(text, entities), table_rows(entities), annotated

    with gr.Blocks(title="MQSPN: grounded multimodal NER") as demo:
        gr.Markdown(
            "# MQSPN: grounded multimodal named entity recognition\n"
            f"Model: `{model_id}`. Upload a photo, type a tweet, and MQSPN finds the named entities and "
            "the box in the photo that shows each (or none when the entity is not in the picture)."
        )
        with gr.Row():
            image = gr.Image(type="pil", label="Photo", elem_id="photo")
            with gr.Column():
                text = gr.Textbox(label="Tweet", lines=3, elem_id="tweet")
                threshold = gr.Slider(0.0, 1.0, value=default_threshold, step=0.05, label="Existence threshold")
                submit = gr.Button("Find entities", variant="primary", elem_id="submit")
        highlighted = gr.HighlightedText(label="Entities in the tweet", elem_id="highlighted", color_map=colors)
        table = gr.Dataframe(headers=TABLE_HEADERS, type="array", label="Entities", elem_id="entities")
        annotated = gr.Image(type="pil", label="Entities in the photo", elem_id="annotated")
        submit.click(predict, inputs=[image, text, threshold], outputs=[highlighted, table, annotated])
    return demo


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("MQSPN_MODEL"),
                        help="exported checkpoint folder or Hub id (default: $MQSPN_MODEL)")
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("give --model or set MQSPN_MODEL to an exported MQSPN checkpoint folder or Hub id")
    check_model(args.model)
    # System fonts: the page then renders without fetching web fonts.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    build_demo(args.model).launch(theme=theme)


if __name__ == "__main__":
    main()
