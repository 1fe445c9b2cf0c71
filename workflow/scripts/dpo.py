"""DPO against the frozen SFT model (started by python, or by torchrun for DDP)."""
import argparse
import json

from zhlm.io import setup_logging
from zhlm.train.dpo import run

parser = argparse.ArgumentParser(description=__doc__)
for flag in ("--sft", "--tokenizer", "--out", "--ckpt", "--settings"):
    parser.add_argument(flag, required=True)
parser.add_argument("--pairs", nargs="+", required=True)
parser.add_argument("--eval-pairs", nargs="*", default=[])
args = parser.parse_args()
setup_logging()
run(args.sft, args.tokenizer, args.pairs, args.out, args.ckpt, eval_files=args.eval_pairs,
    settings=json.loads(args.settings))
