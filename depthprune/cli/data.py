"""`depthprune data ...`: datasets made here (no download)."""
from __future__ import annotations


def cmd_synth_detect(args) -> int:
    from ..data import make_synth_detect
    data_yaml = make_synth_detect(args.out, seed=args.seed, train=args.train, val=args.val, imgsz=args.imgsz,
                                  classes=args.classes, force=args.force)
    print(f"wrote {args.train} train and {args.val} val images; dataset YAML {data_yaml}")
    return 0


def add_commands(sub) -> None:
    data = sub.add_parser("data", help="make datasets (no download)")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATASET")
    sd = data_sub.add_parser("synth-detect", help="a synthetic shapes detection dataset in ultralytics format")
    sd.add_argument("--out", required=True, help="output directory (images/, labels/, data.yaml)")
    sd.add_argument("--seed", type=int, default=0)
    sd.add_argument("--train", type=int, default=600, help="train images (default 600)")
    sd.add_argument("--val", type=int, default=150, help="val images (default 150)")
    sd.add_argument("--imgsz", type=int, default=320, help="image side in pixels (default 320)")
    sd.add_argument("--classes", type=int, default=4, help="shape classes, 1 to 6 (default 4)")
    sd.add_argument("--force", action="store_true",
                    help="replace --out if it is a depthprune output (a dataset made here); never the current "
                         "directory or one holding it")
    sd.set_defaults(func=cmd_synth_detect)
