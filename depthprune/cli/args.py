"""Argument parsing for the CLI: a parser whose errors are one line, range-checked numeric
types, and the names of the library's choices (kept here so that ``--help`` imports no torch;
a unit test checks they equal the library's)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from ..errors import UserError

SCORES = ("angular", "angular-last", "bi", "taylor", "ce", "ppl", "output", "random", "reversed")
SCHEDULES = ("paper", "iterative", "shared", "shared-iterative", "window")
GRANULARITIES = ("fine", "sublayer", "block", "attention", "mixed")
METHODS = ("magnitude", "wanda", "stade", "stade-nobias")
CHANNELS = ("taylor", "magnitude")
EFFORTS = ("fast", "balanced", "best")  # prune --effort
BUDGETS = ("params", "flops", "kv-cache", "latency")  # prune --budget
DTYPES = ("auto", "float32", "bfloat16", "float16")


class OneLineParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors are one line on stderr (exit code 2), the
    same shape as every other depthprune error, pointing at ``--help`` for the usage."""

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())
        self.exit(2, f"depthprune: error: {message} (see `{self.prog} --help`)\n")


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def count_or_all(text: str) -> int | str:
    """A count (>= 0) or ``all``."""
    if text == "all":
        return text
    if not text.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"expected a count or 'all', got {text!r}")
    return int_at_least(0)(text)


count_or_all.__name__ = "count or 'all'"


def fraction(text: str) -> float:
    """A float in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.2, got {text!r}") from None
    if not 0 <= value < 1:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), got {text}")
    return value


def nm_pattern(text: str) -> str:
    """``N:M`` with integers 0 < N < M (e.g. 2:4)."""
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"pattern must be N:M with integers, e.g. 2:4, got {text!r}")
    n, m = (int(p) for p in parts)
    if not 0 < n < m:
        raise argparse.ArgumentTypeError(f"pattern N:M needs 0 < N < M, got {text!r}")
    return f"{n}:{m}"


def add_model_args(sp: argparse.ArgumentParser, help: str = "model spec (smollm2-135m, yolov5n.yaml, HF dir, ...)") -> None:
    sp.add_argument("--model", required=True, help=help)
    sp.add_argument("--trust-checkpoint", action="store_true",
                    help="allow unpickling a .pt checkpoint given as --model (only one you trust)")
    sp.add_argument("--trust-code", action="store_true",
                    help="allow code that comes with a model: an output directory whose plan.json names a python: "
                         "base (imports and runs it) or a .pt base (unpickles it), a Hugging Face model whose "
                         "config.json ships its own code (auto_map), a model YAML that names code; implies "
                         "--trust-checkpoint")
    add_placement_args(sp)
    add_quiet(sp)


def add_placement_args(sp: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype`` (see `depthprune.placement`)."""
    sp.add_argument("--device", default="auto", metavar="DEVICE",
                    help="cpu, cuda, cuda:N or auto (default: the GPU when there is one, spread over every GPU "
                         "when the model does not fit one; else cpu)")
    sp.add_argument("--dtype", default="auto", choices=DTYPES,
                    help="precision to load and write the model in (default auto: the checkpoint's own; the "
                         "packaged GGUF and config-built models are float32)")


def placement(args):
    """The `depthprune.placement.Placement` of ``args``, checked (a device that is not there:
    one line)."""
    from ..placement import Placement, check
    return check(Placement(getattr(args, "device", "auto"), getattr(args, "dtype", "auto")))


def add_quiet(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines on stderr")


def trusts_checkpoint(args) -> bool:
    return bool(getattr(args, "trust_checkpoint", False) or getattr(args, "trust_code", False))


def check_model_input(args) -> None:
    """``--model`` of a command that reads a spec or an output directory: the directory's plan
    (and whether it runs code) or the spec, checked before anything is loaded."""
    from ..adapters import check_spec
    from ..io.plan_file import check_model_dir, is_model_dir
    placement(args)
    if is_model_dir(args.model):
        check_model_dir(args.model, args.trust_code)
    else:
        check_spec(args.model, trusts_checkpoint(args), getattr(args, "trust_code", False))


def progress(args) -> bool:
    return not getattr(args, "quiet", False)


def add_calib_args(p: argparse.ArgumentParser, samples: int = 64) -> None:
    p.add_argument("--calib", default="shakespeare:calib",
                   help="calibration text: shakespeare:calib (default), shakespeare:PLAY, pydoc:reference or a "
                        "UTF-8 text file; several, comma-separated, are mixed in equal shares of the windows "
                        "(e.g. shakespeare:calib,pydoc:reference)")
    p.add_argument("--calib-samples", type=int_at_least(1), default=samples,
                   help=f"calibration windows (images for YOLO; default {samples})")
    p.add_argument("--seq-len", type=int_at_least(2), default=256,
                   help="tokens per window, at most the model's context (default 256)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="windows per forward (default 8)")


def finish_output(od, files: dict, lm) -> None:
    """Write ``files`` and ``lm``'s model into the `OutputDir` ``od``, then its report.html (part
    of the output: written before the commit), then move it into place."""
    from ..io.self_contained import write_model_files
    from ..viz.report_html import write_report
    od.write(files, write_model=None if lm is None else (lambda d: write_model_files(lm, d)))
    write_report(od.tmp, shown=od.path)
    od.commit()


def print_json(obj) -> None:
    import json
    sys.stdout.write(json.dumps(obj) + "\n")


def traced(lm, build):
    """Run ``build()`` (which traces ``lm``); a model whose forward fails on its own example inputs
    (a model the user wrote, ``python:``, or any model that fails the same way untraced) is
    not a depthprune failure: one line, not a traceback."""
    try:
        return build()
    except UserError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError, AttributeError) as e:
        if not lm.adapter.user_model and _runs(lm):
            raise  # the model runs untraced: the trace broke it
        text = " ".join(str(e).split())[:200]
        raise UserError(f"running {lm.spec} on its example inputs failed: {type(e).__name__}: {text}") from None


def _runs(lm) -> bool:
    import torch

    from ..graph.build import default_forward
    try:
        with torch.no_grad():
            (lm.forward_fn or default_forward)(lm.model, lm.example_inputs)
    except Exception:  # noqa: BLE001 - any failure of the model's own forward is the answer
        return False
    return True
