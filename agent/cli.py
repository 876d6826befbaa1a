"""The `bestshot` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from agent.models import FACENET
from engines.prepare import DEFAULT_RECIPE

log = logging.getLogger("bestshot")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"pruning recipe for the twin (default {DEFAULT_RECIPE})")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for inference (default: all cores)")
    p.add_argument("--cache", type=Path, default=None, help="prepared-model cache directory")
    p.add_argument("--detector", default="centerface", choices=["centerface", "yunet", "scrfd", "retinaface"])
    p.add_argument("--detector-model", default=None, help="ONNX file of the detector (CenterFace: built in)")


def _detector(args):
    from agent.detect import DetectorSpec, make_detector

    return make_detector(DetectorSpec(kind=args.detector, path=args.detector_model, threads=args.threads))


def cmd_score(args) -> int:
    from agent.factory import build_scorer
    from agent.scoring_cli import score_paths

    scorer, _ = build_scorer(FACENET, args.recipe, threads=args.threads, cache=args.cache)
    detector = None if args.aligned else _detector(args)
    stats = score_paths(args.paths, scorer, detector, sys.stdout, args.json, args.embedding)
    log.info("%d images, %d faces scored, %d files failed", stats.images, stats.faces, stats.failed)
    return 1 if stats.failed else 0


def cmd_models(args) -> int:
    from agent.detect import DetectorSpec
    from agent.scoring_cli import models_report, print_models
    from engines.prepare import prepare_fr

    prepared = prepare_fr(FACENET, args.recipe, args.cache)
    det_path = None
    if args.detector == "centerface" and args.detector_model is None:
        from engines.centerface import default_centerface_path

        det_path = default_centerface_path()
    elif args.detector_model:
        det_path = Path(DetectorSpec(kind=args.detector, path=args.detector_model).path)
    report = models_report(prepared, det_path)
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        print_models(report)
    return 0


def cmd_bench_score(args) -> int:
    from agent.bench import bench_score

    bench_score(args.recipe, [int(b) for b in args.batches.split(",")], args.faces, args.threads, args.cache,
                sys.stdout)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bestshot", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="score the faces in still images (files or folders)")
    p.add_argument("paths", nargs="+")
    p.add_argument("--aligned", action="store_true", help="each image is already an aligned face crop")
    p.add_argument("--json", action="store_true", help="one JSON object per face (default: text lines)")
    p.add_argument("--embedding", action="store_true", help="include the dense embedding (with --json)")
    _common(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("models", help="show the prepared models (prepares them if needed)")
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_models)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("score", help="faces/s and peak memory of the scoring forms, cv2.dnn as reference")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--faces", type=int, default=64, help="faces per measurement")
    _common(p)
    p.set_defaults(func=cmd_bench_score)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
