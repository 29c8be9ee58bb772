"""Draw a training run's metrics.jsonl as a PNG: the training loss per step and the dev GMNER / MNER /
EEG F1 per epoch (examples/train.py writes OUTPUT/metrics.png itself at the end of training).

    python examples/plot_metrics.py runs/demo/metrics.jsonl [--output runs/demo/metrics.png]
"""

import argparse
import sys

from modeling_mqspn.tools.plot import plot_metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", help="the metrics.jsonl of a run")
    parser.add_argument("--output", help="the PNG (default: metrics.png beside the metrics file)")
    args = parser.parse_args(argv)
    try:
        path = plot_metrics(args.metrics, args.output)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
