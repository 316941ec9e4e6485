"""Check (a) on a real run: the `dense` and `decilm` exports, loaded with plain transformers (decilm with
trust_remote_code), give the native model's logits on held-out text.

    python tests/engines/check_transformers.py --run runs/search/<timestamp> [--sequences 4 --out report.json]

Prints, per format, the max |Δ logit| against `load_pruned` on the first held-out sequences of the run's data
(tests/test_engine_formats.py checks the same on tiny plans in the test suite)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from allocator.app.export_job import load_search_job
from allocator.model.calibration_data import build_calibration_data
from allocator.model.engines import export_dir
from allocator.model.runtime import load_pruned

LOADERS = {"dense": {}, "decilm": {"trust_remote_code": True}}


def logit_differences(run: Path, sequences: int) -> dict:
    from transformers import AutoModelForCausalLM

    native, tokenizer, _ = load_pruned(run)
    data = build_calibration_data(load_search_job(run).data, tokenizer)
    ids = data.heldout[:sequences]
    with torch.inference_mode():
        want = native(ids).logits
        report = {"sequences": int(ids.shape[0]), "tokens_per_sequence": int(ids.shape[1]),
                  "native_logit_range": [float(want.min()), float(want.max())], "formats": {}}
        for name, kwargs in LOADERS.items():
            path = export_dir(run, name)
            if not path.is_dir():
                continue
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
            got = model(ids).logits
            report["formats"][name] = {
                "class": type(model).__name__,
                "max_abs_logit_diff": float((got - want).abs().max()),
                "same_argmax_share": float((got.argmax(-1) == want.argmax(-1)).float().mean()),
            }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a search run directory with export/<format>/")
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    report = logit_differences(args.run, args.sequences)
    for name, row in report["formats"].items():
        print(f"{name:>7} ({row['class']}): max |Δ logit| vs native {row['max_abs_logit_diff']:.3e}, same argmax "
              f"{row['same_argmax_share']:.1%} ({report['sequences']} held-out sequences x "
              f"{report['tokens_per_sequence']} tokens)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
