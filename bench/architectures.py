"""The support table: the property battery of `tests/battery.py` over the zoo of `tests/archs.py`.

    python bench/architectures.py [--only llama,gpt2,...] [--kinds decoder,encoder] [--no-sequences]
                                  [--seeds 3 --steps 15] [--failures]

Columns: candidates listed / units; listing seconds; single prunes that hold every contract /
candidates; promise mismatches (single prunes and sequence steps); failed random sequences /
sequences run; max |delta logit| of block deletion and attention-sublayer skip (HF decoders);
seconds for the whole battery on that model. ``--failures`` prints each failure below the table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from archs import FULL_SIZE, ZOO as TEST_ZOO  # noqa: E402
from battery import run_battery  # noqa: E402

#: the test zoo plus the full-size models its small CNN builds stand for
ZOO = {**TEST_ZOO, **FULL_SIZE}


def _diff(x: float | None, errors: list) -> str:
    if x is not None:
        return f"{x:.1e}"
    return "error" if errors else "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", help="comma-separated zoo names")
    ap.add_argument("--kinds", help="comma-separated kinds (decoder, encoder, cnn, yolo)")
    ap.add_argument("--no-sequences", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--failures", action="store_true", help="print every failure")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.only.split(",") if args.only else list(ZOO)
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        ap.error(f"not in the zoo: {', '.join(unknown)}")
    kinds = set(args.kinds.split(",")) if args.kinds else None
    head = f"{'model':<24} {'kind':<8} {'cands':>9} {'list s':>7} {'single ok':>10} {'promise':>8} " \
           f"{'seq fail':>8} {'block':>8} {'attn':>8} {'seconds':>8}"
    print(head)
    print("-" * len(head))
    reports = []
    for name in names:
        arch = ZOO[name]()
        if kinds and arch.kind not in kinds:
            continue
        r = run_battery(arch, sequences=not args.no_sequences, seeds=tuple(range(args.seeds)), steps=args.steps)
        reports.append(r)
        if r.graph_error:
            print(f"{name:<24} {r.kind:<8} graph/candidates failed: {r.graph_error}  ({r.seconds:.1f} s)", flush=True)
            continue
        seqs = 0 if args.no_sequences else args.seeds
        seq_failed = len({f.split(":")[0] for f in r.sequence_failures})
        print(f"{name:<24} {r.kind:<8} {f'{r.candidates}/{r.units}':>9} {r.listing_s:>7.2f} "
              f"{f'{r.single_ok}/{r.candidates}':>10} {r.promise_mismatches:>8} {f'{seq_failed}/{seqs}':>8} "
              f"{_diff(r.block_diff, r.equivalence_errors):>8} {_diff(r.attention_diff, r.equivalence_errors):>8} "
              f"{r.seconds:>8.1f}", flush=True)
    if args.failures:
        for r in reports:
            fails = ([r.graph_error] if r.graph_error else []) + r.single_failures + r.sequence_failures + \
                r.equivalence_errors
            if fails:
                print(f"\n{r.name}:")
                for f in fails:
                    print(f"  {f}")


if __name__ == "__main__":
    main()
