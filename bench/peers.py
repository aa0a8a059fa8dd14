"""The hallucination-reduction baselines against plain `generate` on the demo VLM, in the same run.

The figures the issue compares with its peers (MitigV 0.1.7 on the same demo VLM: VCD 2.62x, ICD 3.09x, M3ID
1.95x of its own plain generate; OPERA about 17x HF's 5-beam search): greedy decoding of `--new-tokens` (32)
tokens, each variant timed against its baseline (plain `generate`, or another one such as HF beam search)
interleaved in one process, medians over `--repeats`, and printed as ratios. Every variant attaches before and
detaches after its calls (untimed), so all read the same weights.

Adding a variant is one line of `VARIANTS`: (name, a function giving the methods, extra generate kwargs, the
name of its baseline in `BASELINES`). Targets: VCD, ICD, M3ID and PAI <= 2.05x plain (a contrast branch doubles
the batch rows: the arithmetic is about 2x, not more).

    python bench/peers.py [--new-tokens 32] [--repeats 5] [--only VCD,ICD]
    python bench/peers.py --smoke            (2 new tokens, 1 repeat: checks the script)

Ratios on a shared machine are noisy; compare them within one run.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch
from common import interleaved
from PIL import Image

import vlmfix
from vlmfix.demo.assemble import prompt_for

#: baseline name -> generate kwargs (besides the greedy decoding of the new tokens)
BASELINES: dict[str, dict] = {"plain": {}, "HF beam search 5": {"num_beams": 5}}

#: (name, methods, extra generate kwargs, baseline)
VARIANTS: list[tuple[str, Callable[[], list], dict, str]] = [
    ("VCD", lambda: [vlmfix.VCD()], {}, "plain"),
    ("ICD", lambda: [vlmfix.ICD()], {}, "plain"),
    ("PAI", lambda: [vlmfix.PAI()], {}, "plain"),
    ("M3ID", lambda: [vlmfix.M3ID()], {}, "plain"),
    ("ONLY", lambda: [vlmfix.ONLY()], {}, "plain"),
    ("VAF", lambda: [vlmfix.VAF()], {}, "plain"),
    ("OPERA", lambda: [vlmfix.OPERA()], {}, "HF beam search 5"),
]

TARGETS = {"VCD": 2.05, "ICD": 2.05, "M3ID": 2.05, "PAI": 2.05, "ONLY": 2.05, "OPERA": 2.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--smoke", action="store_true", help="2 new tokens, 1 repeat: checks the script")
    args = ap.parse_args()
    n, repeats = (2, 1) if args.smoke else (args.new_tokens, args.repeats)
    wanted = [v for v in VARIANTS if not args.only or v[0] in args.only.split(",")]
    torch.set_num_threads(1)
    say("loading the demo VLM ...")
    model, processor = vlmfix.load_demo()
    image = Image.new("RGB", (400, 300), (90, 150, 210))
    inputs = dict(processor(images=image, text=prompt_for("Describe the image in detail."), return_tensors="pt"))
    say(f"  prompt of {inputs['input_ids'].shape[1]} tokens; greedy, {n} new tokens, {repeats} repeats")

    def gen(kwargs: dict) -> Callable[[], object]:
        return lambda: model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kwargs)

    runs: dict[str, tuple] = {}
    for name, make, kwargs, base in wanted:
        runs.setdefault(base, (gen(BASELINES[base]),))
        runs[name] = (gen({**BASELINES[base], **kwargs}), make(), model, processor)
    times = interleaved(runs, repeats)
    print(f"demo VLM, greedy {n} new tokens, medians of {repeats} interleaved repeats (CPU, 1 thread)")
    for base in dict.fromkeys(b for *_, b in wanted):
        print(f"  {base:<18} {times[base]:.3f} s")
    for name, _, _, base in wanted:
        ratio = times[name] / times[base]
        target = TARGETS.get(name)
        verdict = "" if target is None else f"  (target <= {target}: {'ok' if ratio <= target else 'ABOVE TARGET'})"
        print(f"  {name:<18} {times[name]:.3f} s  {ratio:.2f}x {base}{verdict}")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
