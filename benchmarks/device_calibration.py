"""Add a device's cost constants to a calibration when the base weights cannot travel to that device.

    # on the device (the heads folder travels; the base model's config.json, not its weights):
    python benchmarks/device_calibration.py profile model_cards/smollm2-135m-drex \\
        --base-config runs/gpu/smollm2-config.json --out runs/gpu-calibration
    # back here: add that entry to the folder's calibration.json, card and plot
    python benchmarks/device_calibration.py merge model_cards/smollm2-135m-drex runs/gpu-calibration/calibration.json

`profile` builds a base model of the config's shapes with random weights on the device (bf16 on CUDA,
as `drex calibrate --dtype auto` loads it), puts the folder's trained heads on it, and runs `drex
calibrate`'s steps 2-5 on the observations the folder's CPU calibration saved (greedy full-depth
tokens of the real model): segment, check, fill and regrouping times, which exits pay on this device,
Learn-then-Test thresholds for those, and the cost fit's error on held-out row counts. Timings depend
on the shapes, not on the weights' values, so the entry is the one the real model would get there;
the thresholds and exit fractions come from the real model's observations. With the real weights at
hand, `drex calibrate MODEL_DIR --reuse-observations` on the device does the same in one step.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch


def profile(args: argparse.Namespace) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    from drex_hf import EarlyExitModelForCausalLM
    from drex_hf.calibration.calibrate import OBSERVATIONS_NAME, calibrate
    from drex_hf.calibration.thresholds import Observations
    from drex_hf.cli.common import pick_device, pick_dtype

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    config = AutoConfig.from_pretrained(args.base_config)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model = EarlyExitModelForCausalLM.from_pretrained(args.model, base_model=base, calibration=False).eval()
    observations = Observations.load(Path(args.model) / OBSERVATIONS_NAME)
    started = time.time()
    result = calibrate(
        model,
        [],
        observations=observations,
        repeats=args.repeats,
        context=args.context,
        command="python benchmarks/device_calibration.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    result.pop("observations_data")
    name = next(iter(result["cost_models"]))
    entry = result["cost_models"][name]
    entry["made_by"] = result["command"] + " (random base weights of the real shapes; the real model's observations)"
    entry["created"] = result["created"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration.json").write_text(json.dumps(result, indent=2) + "\n")
    err = entry["prediction_error"]
    print(
        f"{name} ({entry['dtype']}): exits paying {entry['exits_paying']}, thresholds {entry['thresholds']}, "
        f"expected speed-up {entry['expected_speedup']}, cost fit error median {err['median']:.1%} "
        f"p95 {err['p95']:.1%}; {time.time() - started:.0f} s"
    )
    return 0


def merge(args: argparse.Namespace) -> int:
    from drex_hf.calibration.calibrate import plot, save
    from drex_hf.config import CALIBRATION_NAME

    folder = Path(args.model)
    mine = json.loads((folder / CALIBRATION_NAME).read_text())
    theirs = json.loads(Path(args.entry).read_text())
    if theirs["exit_layers"] != mine["exit_layers"] or theirs["guarantee"] != mine["guarantee"]:
        raise SystemExit(f"{args.entry} was not made from {folder}'s observations (exit layers or guarantee differ)")
    mine["cost_models"].update(theirs["cost_models"])
    first = next(iter(mine["cost_models"]))  # the plot keeps showing the device the folder was calibrated on
    save(mine, folder, plot(mine, first))
    print(f"{folder / CALIBRATION_NAME}: devices {', '.join(mine['cost_models'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("profile", help="on the device: profile a random-weight base of the real shapes")
    p.add_argument("model", help="exit-heads folder with calibration_observations.safetensors")
    p.add_argument("--base-config", required=True, help="the base model's config.json")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--out", type=Path, default=Path("runs/device-calibration"))
    m = sub.add_parser("merge", help="add a profiled device's entry to the folder's calibration")
    m.add_argument("model")
    m.add_argument("entry", help="calibration.json written by `profile`")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    return profile(args) if args.verb == "profile" else merge(args)


if __name__ == "__main__":
    sys.exit(main())
