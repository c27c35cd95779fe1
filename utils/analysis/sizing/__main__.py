"""`python -m utils.analysis.sizing CONFIG [--r 32] [--alpha 64] [--target-modules q_proj,...] [--json]`."""

from __future__ import annotations

import argparse
import json
import sys

from utils.analysis.sizing.models import size_report, target_names
from utils.analysis.sizing.report import format_report, report_json
from utils.core.errors import InputError, LoraLensError
from utils.core.profiles import PROFILES, LoraSettings


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _positive(kind: str, parse):
    """An argparse type: `parse(text)`, refused unless it gives a value above 0."""

    def check(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a positive {kind}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be a positive {kind}, got {text}")
        return int(value) if isinstance(value, float) and value.is_integer() else value

    return check


_positive_int = _positive("integer", int)
_positive_number = _positive("number", float)


def main(argv: list[str] | None = None) -> int:
    """`python -m utils.analysis.sizing CONFIG [--r 32] [--alpha 64] [--target-modules ...] [--json]`."""
    parser = _Parser(
        prog="python -m utils.analysis.sizing",
        description="LoRA adapter and base-model sizes for a causal-LM config, computed step by step.",
    )
    parser.add_argument(
        "config", help=f"config.json, a folder holding one, or a profile ({', '.join(PROFILES)})"
    )
    parser.add_argument("--r", type=_positive_int, default=None, help="LoRA rank (default 32)")
    parser.add_argument("--alpha", type=_positive_number, default=None, help="LoRA alpha (default 64)")
    parser.add_argument(
        "--target-modules",
        default=None,
        help="comma-separated module names, or all-linear (default q_proj,k_proj,v_proj,o_proj)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "--kept-dtype", default=None, help="dtype of the layers NF4 leaves alone (default: config's)"
    )
    args = parser.parse_args(argv)

    default = PROFILES[args.config].lora if args.config in PROFILES else LoraSettings()
    try:
        lora = LoraSettings(
            r=args.r if args.r is not None else default.r,
            alpha=args.alpha if args.alpha is not None else default.alpha,
            dropout=default.dropout,
            target_modules=target_names(args.target_modules)
            if args.target_modules
            else default.target_modules,
        )
        if args.kept_dtype is not None and args.kept_dtype not in ("float32", "bfloat16", "float16"):
            raise InputError(f"--kept-dtype must be float32, bfloat16 or float16, got {args.kept_dtype!r}.")
        report = size_report(args.config, lora, args.kept_dtype)
    except LoraLensError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    if args.json:
        print(json.dumps(report_json(report), indent=2))
    else:
        print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
