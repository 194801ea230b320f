"""The Python API end to end: recipe -> fine-tune -> export -> verify -> infer, in a few lines.

    python samples/api_end_to_end.py [OUT]     # default OUT: out/api-sample

Trains for a handful of steps only (it is a demo of the API, not of accuracy; see
recipes/minilm-sentiment.yaml for the real run).
"""

from __future__ import annotations

import sys
from pathlib import Path

from exporter.recipes import load_recipe
from exporter.run import run_recipe
from exporter.runtime import BundleModel
from exporter.verify import verify_bundle

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/api-sample")
    recipe = load_recipe(ROOT / "recipes" / "minilm-sentiment.yaml", {"training.max_steps": 30})
    report = run_recipe(recipe, out, overwrite=True, progress=lambda msg: print(msg, file=sys.stderr))
    tm = report.data["task_metrics"]
    print(f"published {out}: accuracy PyTorch {tm['torch']:.3f}, int8 {tm['variants']['int8']['value']:.3f}")

    # Everything below runs without torch, as it would on the device.
    print("verify:", "passed" if verify_bundle(out)["passed"] else "FAILED")
    model = BundleModel(out)  # the default variant: int8 when it passed its gate
    for r in model.infer(["Five stars, would book again.", "The charger stopped working within a week."]):
        print(f"{r['label']:>8} {r['score']:.3f}  {r['text']}")


if __name__ == "__main__":
    main()
