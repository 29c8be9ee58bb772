"""Score grounded NER predictions with the official GMNER / MNER / EEG protocol (docs/DESIGN.md §8).

    python examples/evaluate.py --predictions P.jsonl --references R.jsonl [--output OUT.json]

Both files follow the evaluation JSONL contract (docs/ARCHITECTURE.md): one object per tweet,
predictions ``{"id", "entities": [{"start", "end", "type", "box": [x1, y1, x2, y2] | null}]}``,
references ``{"id", "entities": [{"start", "end", "type", "boxes": [[...], ...]}]}`` (write them from
a dataset with ``processing/build_dataset.py --references_jsonl``). The references may also be the
dataset JSONL that ``examples/train.py`` reads (docs/DATA.md: rows with ``words`` or ``text``), read
with the same reader (an entity without ``boxes`` is not groundable). A prediction row with an
``"error"`` and no ``"entities"`` (what ``examples/predict.py`` writes for an input it could not
predict) scores as no prediction and is counted (``failed_predictions`` in the JSON). When every
reference also carries ``"proposals"``, the report adds how many groundable entities no proposal
covers.

Prints a table (percentages) and, with ``--output``, writes the JSON result: keys ``gmner``,
``mner``, ``eeg``, each with ``precision``, ``recall``, ``f1`` (fractions), ``per_type``, ``macro``
and ``counts``, and when prediction rows were errors ``failed_predictions`` (``count``, ``ids``).
``--errors`` adds ``mner_errors``: each wrong prediction as a duplicate, a wrong type, a wrong boundary, both, or
spurious, and each gold entity not found as missed or misread (``tools.metrics.mner_errors``).
"""

import argparse
import json
import sys

from modeling_mqspn.tools.metrics import (
    evaluate_grounded_ner,
    format_mner_errors,
    format_results_table,
    load_evaluation_jsonl,
    load_references,
    mner_errors,
    prediction_rows,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--predictions", required=True, help="predictions JSONL")
    parser.add_argument("--references", required=True, help="references JSONL")
    parser.add_argument("--output", help="write the result as JSON here")
    parser.add_argument("--errors", action="store_true",
                        help="also break MNER's errors down: duplicate, wrong type, wrong boundary, both, spurious; gold missed or misread")
    args = parser.parse_args(argv)

    try:
        predictions, failed = prediction_rows(load_evaluation_jsonl(args.predictions))
        references = load_references(args.references)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if failed:
        shown = ", ".join(repr(i) for i in failed[:5]) + (", ..." if len(failed) > 5 else "")
        print(f"{len(failed)} of {len(predictions)} prediction rows are errors (predict.py could not predict them): "
              f"scored as no prediction ({shown})")
    try:
        results = evaluate_grounded_ner(predictions, references)
    except ValueError as error:
        print(f"error: predictions {args.predictions}, references {args.references}: {error}", file=sys.stderr)
        return 2

    if failed:
        results["failed_predictions"] = {"count": len(failed), "ids": failed}
    print(format_results_table(results))
    if args.errors:
        results["mner_errors"] = mner_errors(predictions, references)
        print(format_mner_errors(results["mner_errors"]))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
