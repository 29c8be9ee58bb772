"""Write the synthetic demo release (Twitter-GMNER layout) with ``modeling_mqspn.tools.demo_data``.

    python processing/make_demo_data.py --output demo_data --seed 0
    python processing/make_demo_data.py --output /tmp/big --num_train 2000 --entities_per_type 10

Same seed and options give byte-identical files. docs/DEMO.md describes the data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from modeling_mqspn.tools.demo_data import DemoDataConfig, generate_demo_release


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder to write the release into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a release already in --output")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes drawing the tweets (default: one per CPU); the files do not depend on it")
    for field in dataclasses.fields(DemoDataConfig):
        parser.add_argument(f"--{field.name}", type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    config = DemoDataConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoDataConfig)})
    try:
        summary = generate_demo_release(args.output, seed=args.seed, config=config, overwrite=args.overwrite, workers=args.workers)
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    print(json.dumps(summary["splits"], indent=2))
    return summary


if __name__ == "__main__":
    main()
