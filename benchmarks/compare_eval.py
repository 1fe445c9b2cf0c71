"""Two or more runs' eval summaries side by side, with the differences.

Each file is a results/eval/summary.json written by the report rule (flat
{"stage.metric": value}, zhlm.eval.report.summary). One row per metric, one column per
file, each column after the first followed by Δ: its value minus the previous column's.
Lower is better for bpc and looping shares, higher for the rest.

    cp results/eval/summary.json /tmp/before.json     # then change the recipe, rerun the DAG
    python benchmarks/compare_eval.py /tmp/before.json results/eval/summary.json
"""
import argparse

from zhlm.eval.report import delta_table
from zhlm.io import read_json


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summaries", nargs="+", help="summary.json files, oldest first")
    args = parser.parse_args(argv)
    if len(args.summaries) < 2:
        parser.error("give two or more summary files to compare")
    print("\n".join(delta_table({path: read_json(path) for path in args.summaries})))


if __name__ == "__main__":
    main()
