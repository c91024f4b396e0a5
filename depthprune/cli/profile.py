"""``depthprune profile``: the per-module latency table ``prune --budget latency`` counts with, and
where prune finds one (``--latency-table``, else the cache, else measured and cached)."""
from __future__ import annotations

import json
import os

from .args import add_model_args, int_at_least, placement, print_json, progress, trusts_checkpoint
from ..errors import UserError


def _sample(lm, args) -> list:
    """One calibration sample (one window of ``--seq-len`` tokens, one image, or the example inputs)."""
    from ..adapters.load import calibration
    from ..importance.budget import one_sample
    return one_sample(calibration(lm, args.calib, 1, args.seq_len, 1)[0])


def _cache_path(lm, sample):
    """Where the cache keeps the table of this model (architecture), device, dtype, thread count
    and input shape."""
    import re

    import torch
    from ..adapters.packaged import cache_dir
    from ..depth.plan import fingerprint
    from ..importance.latency import input_shape, model_device, model_dtype
    shape = re.sub(r"[^0-9]+", "x", json.dumps(input_shape(sample))).strip("x")
    key = f"{fingerprint(lm.model)}-{model_device(lm.model)}-{model_dtype(lm.model)}-{torch.get_num_threads()}t-{shape}"
    return cache_dir() / "latency" / f"{key.replace(':', '_')}.json"


def read_table(path: str, lm=None):
    """The `LatencyTable` in the JSON file ``path`` (checked against ``lm.model`` when given)."""
    from ..importance.latency import LatencyTable
    from ..integrity import read_json_file
    if not os.path.isfile(path):
        raise UserError(f"no such latency table: {path} (`depthprune profile --model ... --out {path}` writes one)")
    table = LatencyTable.from_json(read_json_file(path, "latency table"), f"latency table {path}")
    if lm is not None:
        table.check(lm.model, f"latency table {path}")
    return table


def _cache(table, path) -> None:
    """Keep ``table`` at ``path`` in the cache (best effort: a cache that cannot be written only costs a re-measure)."""
    import tempfile
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(table.to_json(), f)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None and os.path.exists(tmp):  # no half-written entry left behind
            os.unlink(tmp)


def latency_table(lm, args, sample=None):
    """The table ``prune --budget latency`` uses: ``--latency-table``, else the cached one for this
    model, device, dtype, thread count and input shape, else one measured now (and cached)."""
    from ..importance.latency import LatencyTable, profile_latency
    if getattr(args, "latency_table", None):
        return read_table(args.latency_table, lm)
    sample = _sample(lm, args) if sample is None else sample
    path = _cache_path(lm, sample)
    if path.is_file():
        try:
            table = LatencyTable.from_json(json.loads(path.read_text(encoding="utf-8")))
            table.check(lm.model)
            return table
        except (UserError, OSError, ValueError):
            pass  # damaged or stale: measured again
    table = profile_latency(lm.model, lm.forward_fn, sample, progress=progress(args))
    _cache(table, path)
    return table


def cmd_profile(args) -> int:
    from .args import check_model_input
    from ..io.outdir import check_out, write_output_file
    check_model_input(args)
    if args.out:
        check_out(args.out, args.force, [args.model], "file")
    from ..io.model_dir import open_model
    lm, _ = open_model(args.model, trusts_checkpoint(args), args.trust_code, progress(args), placement(args))
    from ..importance.latency import profile_latency
    sample = _sample(lm, args)
    if args.decode:
        if lm.kv_cache_fn is None:
            raise UserError(f"--decode times one decode step with a KV cache; {args.model} is not a causal language "
                            "model with one")
        from ..eval.speed import decode_step
        fwd, inputs = decode_step(lm.model, sample[0])
        table = profile_latency(lm.model, fwd, inputs, rounds=args.rounds, warmup=args.warmup,
                                progress=progress(args), decode_context=int(sample[0].shape[1]))
    else:
        table = profile_latency(lm.model, lm.forward_fn, sample, rounds=args.rounds,
                                warmup=args.warmup, progress=progress(args))
        _cache(table, _cache_path(lm, sample))  # what prune --budget latency looks up
    if args.out:
        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(table.to_json(), f, indent=1)
        write_output_file(args.out, write, args.force, [args.model])
    if table.spread > 0.5:
        import sys
        print(f"depthprune: warning: the slowest and the fastest forward differ by {100 * table.spread:.0f} % of the "
              f"median ({1000 * table.total_s:.1f} ms): the machine is busy; measure again when it is idle, or with "
              "more --rounds", file=sys.stderr)
    if args.json:
        print_json(table.to_json())
        return 0
    top = sorted(table.modules.items(), key=lambda kv: -kv[1]["s"])[:args.top]
    what = f"decode step after {table.decode_context} cached tokens" if table.decode_context else "forward"
    print(f"{args.model}: {1000 * table.total_s:.2f} ms per {what} (median of {table.rounds}, spread "
          f"{100 * table.spread:.1f} %) on {table.device} ({table.dtype}, {table.threads} threads), "
          f"input {table.shape}")
    for name, e in top:
        print(f"{1000 * e['s']:9.3f} ms {100 * e['s'] / table.total_s:5.1f} %  {name or '(outside every module)'} "
              f"[{e['type']}]")
    if args.out:
        print(f"wrote {args.out}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("profile", help="measure the latency of every module (the table prune --budget latency uses)")
    add_model_args(p, help="model spec or a pruned output directory (its table then says what the pruned model "
                           "spends where)")
    p.add_argument("--calib", default="shakespeare:calib",
                   help="text of the timed window (language models; default shakespeare:calib)")
    p.add_argument("--seq-len", type=int_at_least(1), default=256,
                   help="tokens of the timed window (default 256; 1 approximates one decode step without a cache)")
    p.add_argument("--decode", action="store_true",
                   help="time one decode step with a KV cache of --seq-len tokens (causal LMs) instead of a forward of "
                        "--seq-len tokens: the table for decode latency (prune --budget latency --latency-table)")
    p.add_argument("--rounds", type=int_at_least(1), default=10, help="timed forwards (default 10; the median counts)")
    p.add_argument("--warmup", type=int_at_least(0), default=2, help="untimed forwards first (default 2)")
    p.add_argument("--top", type=int_at_least(1), default=15, help="modules listed, slowest first (default 15)")
    p.add_argument("--out", help="write the table as JSON (prune --budget latency --latency-table FILE reads it)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--json", action="store_true", help="print the table as one JSON object")
    p.set_defaults(func=cmd_profile)
