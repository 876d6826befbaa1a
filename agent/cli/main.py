"""The `bestshot` command line.

Exit codes: 0 done (for `run`: the sources ended, or SIGTERM/SIGINT), 1 a failure of the work itself (for `run`:
every input failed for good, e.g. a missing or unreadable file; a live camera that is down is retried, not a
failure), 2 a configuration or usage error, 130 interrupted before the agent ran.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from agent import __version__
from agent.common.fr_spec import FACENET
from engines.prepare import FACENET_RECIPE, GENERIC_RECIPE

log = logging.getLogger("bestshot")

EXIT_INPUTS_FAILED = 1  # `run`: every input failed for good (systemd restarts the service; exit 2 it does not)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="take models, recipe and detector from this YAML configuration")
    p.add_argument("--recipe", help=f"pruning recipe for the twin (default: {FACENET_RECIPE} for FaceNet, "
                                                  f"{GENERIC_RECIPE} for other models)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for inference (default: all cores)")
    p.add_argument("--cache", type=Path, default=None, help="prepared-model cache directory")
    _detector_args(p)


def _detector_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--detector", choices=["centerface", "yunet", "scrfd", "retinaface"], help="default centerface")
    p.add_argument("--detector-model", default=None,
                   help="ONNX file of the detector (CenterFace, RetinaFace: from their wheels)")


def _models(args):
    """(FR spec, recipe, cache dir, detector spec, backend) from --config and the flags that override it."""
    from dataclasses import replace

    from agent.common.cache import use_cache_root

    cfg = _config_or_default(args.config)
    use_cache_root(args.cache or cfg.models.cache_dir)
    det = cfg.defaults.detector
    if args.detector or args.detector_model:
        det = replace(det, kind=args.detector or det.kind, path=args.detector_model)
    det = replace(det, threads=args.threads or det.threads)
    return (cfg.models.fr, args.recipe or cfg.models.recipe, args.cache or cfg.models.cache_dir, det,
            cfg.backend)


def cmd_score(args) -> int:
    from agent.cli.score import score_paths
    from agent.pipeline.detect import make_detector
    from agent.pipeline.score import build_scorer
    from agent.quality.selection import with_selection

    fr, recipe, cache, det, backend = _models(args)
    scorer, prepared = build_scorer(fr, recipe, threads=args.threads, cache=cache, backend=backend)
    detector = None if args.aligned else make_detector(det)
    ers = with_selection(scorer, prepared, det, args.selection)
    stats = score_paths(args.paths, scorer, detector, sys.stdout, args.json, args.embedding, ers)
    log.info("%d images, %d faces scored, %d files failed", stats.images, stats.faces, stats.failed)
    return 1 if stats.failed else 0


def _config_or_default(path: Path | None):
    from agent.service.config import load_config, parse_config

    return load_config(path) if path else parse_config({"cameras": [{"id": "none", "url": "none"}]}, "defaults")


def cmd_build_engines(args) -> int:
    from agent.common.cache import use_cache_root
    from engines.prepare import prepare_fr
    from engines.trt_build import build_engines

    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        log.error("TensorRT is not available here (%s): install the `gpu` extra on a CUDA machine, or use "
                  "JetPack's TensorRT on a Jetson (docs/GPU.md)", e)
        return 2
    cfg = _config_or_default(args.config)
    use_cache_root(cfg.models.cache_dir)
    prepared = prepare_fr(cfg.models.fr, cfg.models.recipe, cfg.models.cache_dir)
    for kind, eng in build_engines(prepared, cfg.engines, progress=lambda line: sys.stdout.write(line + "\n")).items():
        sys.stdout.write(f"{kind}: {eng.plan}\n")
    return 0


def cmd_models(args) -> int:
    from agent.cli.score import models_report, print_models
    from agent.pipeline.detect import detector_path
    from engines.prepare import prepare_fr

    fr, recipe, cache, det, _ = _models(args)
    prepared = prepare_fr(fr, recipe, cache)
    det_path = detector_path(det)
    from engines.trt_build import engine_lines, engine_report

    report = models_report(prepared, det_path)
    report["engines"] = engine_report(prepared)
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
    else:
        print_models(report)
        sys.stdout.write("\n".join(engine_lines(report["engines"])) + "\n")
    return 0


def cmd_bench_score(args) -> int:
    from agent.cli.bench import bench_score

    if args.backend != "onnxruntime":
        from agent.cli.bench import bench_score_gpu
        from engines.prepare import prepare_fr

        res = bench_score_gpu(prepare_fr(FACENET, args.recipe, args.cache), args.backend,
                              [int(b) for b in args.batches.split(",")], max(args.faces, 256))
        sys.stdout.write(json.dumps(res, indent=2) + "\n")
        return 0
    batches = [int(b) for b in args.batches.split(",")]
    bench_score(args.recipe, batches, args.faces, args.threads, args.cache, sys.stdout)
    return 0


def load_run_config(args):
    """The configuration for `run`: the file, or the embedded default, with the flags applied (and checked like the
    file). Without a file the camera is named by --camera, else after --source (derive_camera_id), else `demo`; a
    file's camera keeps its id unless --camera renames it."""
    from agent.service.config import ConfigError, default_config, derive_camera_id, load_config, parse_config

    if args.config:
        cfg = load_config(args.config)
        if not (args.source or args.camera or args.publish):
            return cfg
        data = cfg.model_dump(mode="json")
        if args.source or args.camera:
            if len(cfg.cameras) != 1:
                raise ConfigError(str(args.config), ["--source and --camera need a configuration with exactly one "
                                                     "camera"])
            cam = data["cameras"][0]
            if args.source:
                cam |= {"url": args.source, "upstream": None}
            cam["id"] = args.camera or cam["id"]
    else:
        source = args.source
        if source is None:
            from agent.pipeline.sources.demo import demo_clip_path

            source = str(demo_clip_path())
            log.info("no configuration: running the embedded demo clip %s", source)
        data = default_config(source, args.camera or (derive_camera_id(source) if args.source else "demo"))
    if args.publish:
        data.setdefault("publisher", {})["endpoint"] = args.publish
    return parse_config(data, "flags")


def cmd_run(args) -> int:
    from agent.service.config import ConfigError
    from agent.service.process import run_agent

    try:
        cfg = load_run_config(args)
    except ConfigError as e:
        for err in e.errors:
            log.error("%s: %s", e.source, err)
        return 2
    summary = run_agent(cfg, args.trace, args.config)
    if summary.every_input_failed:
        log.error("every input failed for good (%s): exit %d", "; ".join(f"camera {c}: {why}" for c, why in
                                                                         summary.failed.items()), EXIT_INPUTS_FAILED)
        return EXIT_INPUTS_FAILED
    return 0


def cmd_subscribe(args) -> int:
    from agent.cli.subscribe import subscribe

    view, stop = None, None
    if args.view:
        from agent.cli.subscribe import serve_view

        try:
            view, stop = serve_view(args.view, args.view_token_env, args.view_allow_plaintext)
        except (ValueError, OSError) as e:
            log.error("--view %s: %s", args.view, e)
            return 2
    if args.endpoint.startswith(("nats://", "tls://")):
        try:
            return cmd_subscribe_nats(args, view.add if view is not None else None)
        finally:
            if stop is not None:
                stop()
    try:
        n = subscribe(args.endpoint, args.out, args.count, args.timeout, mode=args.mode,
                      server_public_key=args.server_key, client_secret_key=args.client_key,
                      on_message=view.add if view is not None else None)
    finally:
        if stop is not None:
            stop()
    log.info("%d messages received", n)
    return 0 if n or args.count is None else 1


def cmd_subscribe_nats(args, on_message=None) -> int:
    from agent.cli.subscribe_nats import NatsConsumer, subscribe_nats

    token = os.environ.get(args.token_env) if args.token_env else None
    consumer = NatsConsumer(url=args.endpoint, stream=args.stream, durable=args.durable, subjects=args.subjects,
                            ack_wait_s=args.ack_wait, tls_ca=args.tls_ca, creds_file=args.creds,
                            nkey_seed_file=args.nkey, token=token)
    stats = subscribe_nats(consumer, args.out, args.count, args.timeout, on_message=on_message)
    return 0 if stats.handled or args.count is None else 1


def cmd_bench_outputs(args) -> int:
    from agent.cli.bench_outputs import bench_outputs

    bench_outputs(sys.stdout, args.count, args.window, args.nats, args.nats_replicas, args.mqtt)
    return 0


def cmd_bench_pipeline(args) -> int:
    from agent.cli.bench import bench_pipeline

    bench_pipeline(args.source, args.budget, args.detect_input, args.detect_every, args.threads,
                   args.compare_unlimited, sys.stdout)
    return 0


def parse_counts(text: str) -> list[int]:
    """'1-8' or '1,2,4,8' -> camera counts, ascending."""
    if "-" in text:
        lo, hi = (int(v) for v in text.split("-", 1))
        return list(range(lo, hi + 1))
    return sorted(int(v) for v in text.split(","))


def cmd_bench_cameras(args) -> int:
    from agent.cli.bench_cameras import CameraBench, bench_cameras

    clips = args.source
    if not clips:
        from agent.pipeline.sources.demo import demo_clip_path

        clips = [str(demo_clip_path())]
    bench = CameraBench(tuple(clips), args.fps, args.duration, args.detect_every, args.detect_input, args.budget,
                        args.threads, args.detector or "centerface", args.detector_model, args.precision)
    res = bench_cameras(bench, parse_counts(args.cameras), sys.stdout)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


def cmd_keys_generate(args) -> int:
    from agent.common.keys import generate_keys

    public, secret = generate_keys(args.dir, args.name)
    sys.stdout.write(f"public key: {public} (give it to the other side)\n"
                     f"secret key: {secret} (mode 0600, keep private)\n")
    return 0


def cmd_check_config(args) -> int:
    from agent.service.config import check_config

    return check_config(args.file, sys.stdout)


def cmd_config_schema(args) -> int:
    from agent.service.config import schema_json

    sys.stdout.write(schema_json())
    return 0


def cmd_ers_calibrate(args) -> int:
    from agent.pipeline.score import build_scorer
    from agent.quality.ers import calibrate_ers, captured_embeddings, save_ers
    from agent.quality.ers_builtin import builtin_ers

    fr, recipe, cache, det, backend = _models(args)
    scorer, prepared = build_scorer(fr, recipe, threads=args.threads, cache=cache, backend=backend)
    captured = captured_embeddings(args.captured, scorer) if args.captured else None
    model = calibrate_ers(scorer, det, args.shared, max_people=args.max_people, captured=captured, seed=args.seed,
                          compare=builtin_ers(scorer, det))
    log.info("saved %s", save_ers(prepared, model))
    sys.stdout.write(json.dumps(model.info, indent=2) + "\n")
    return 0


def _eval_detector(args):
    from agent.pipeline.detect import DetectorSpec

    return DetectorSpec(kind=args.detector or "centerface", path=args.detector_model)


def cmd_eval_pairs(args) -> int:
    from agent.quality.evaluate import eval_pairs

    res = eval_pairs(args.out, args.recipes.split(","), lfw=args.shared / "data/lfw", seed=args.seed,
                     limit=args.limit, threads=args.threads, cache=args.cache, precision=args.precision,
                     detector=_eval_detector(args))
    log.info("wrote %s (%.0f s)", args.out / "pairs.md", res["seconds"])
    return 0


def cmd_eval_tracks(args) -> int:
    from agent.quality.evaluate import eval_tracks

    video = None if args.no_video else args.shared / "data/video/short_hamilton_clip.mp4"
    res = eval_tracks(args.out, args.recipes.split(","), lfw=args.shared / "data/lfw", video=video, seed=args.seed,
                      synthetic=args.synthetic, threads=args.threads, cache=args.cache, demo=args.demo,
                      precision=args.precision, detector=_eval_detector(args), natural=args.natural)
    log.info("wrote %s (%.0f s)", args.out / "tracks.md", res["seconds"])
    return 0


def cmd_tune(args) -> int:
    from agent.quality.tune import RECIPES, tune

    if args.selection:
        from agent.quality.tune import tune_selection

        res = tune_selection(args.out, lfw=args.shared / "data/lfw", seed=args.seed, threads=args.threads,
                             cache=args.cache, detector=_eval_detector(args))
        log.info("wrote %s (%.0f s)", args.out / "tune-selection.md", res["seconds"])
        return 0
    recipes = args.recipes.split(",") if args.recipes else list(RECIPES)
    res = tune(args.out, recipes, lfw=args.shared / "data/lfw", seed=args.seed, limit=args.limit,
               threads=args.threads, cache=args.cache, detector=_eval_detector(args))
    log.info("wrote %s (%.0f s)", args.out / "tune.md", res.get("seconds", 0))
    return 0


def cmd_eval_templates(args) -> int:
    from agent.pipeline.score import build_scorer
    from agent.quality.ers import evaluate_templates
    from agent.quality.selection import with_selection

    fr, recipe, cache, det, backend = _models(args)
    scorer, prepared = build_scorer(fr, recipe, threads=args.threads, cache=cache, backend=backend)
    ers = with_selection(scorer, prepared, det)
    res = evaluate_templates(scorer, det, args.shared, ers, max_people=args.max_people, p_degraded=args.degraded)
    sys.stdout.write(json.dumps(res, indent=2) + "\n")
    return 0


def cmd_curate(args) -> int:
    from agent.pipeline.detect import make_detector
    from agent.pipeline.score import build_scorer
    from agent.quality.curate import curate
    from agent.quality.diffprob import identity_floor
    from agent.quality.selection import with_selection

    fr, recipe, cache, det, backend = _models(args)
    scorer, prepared = build_scorer(fr, recipe, threads=args.threads, cache=cache, backend=backend)
    ers = with_selection(scorer, prepared, det)  # the quality DiffProb visits frames by
    if args.drop_unrecognisable and ers is None:
        log.error("--drop-unrecognisable needs an ERS for this model (see the error above)")
        return 2
    report = curate(args.dir, args.out, scorer, make_detector(det), ers if args.drop_unrecognisable else None,
                    args.eps, args.min_cos, floor=identity_floor(ers))
    sys.stdout.write(json.dumps(report.get("summary", report), indent=2, default=str) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bestshot", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="score the faces in still images (files or folders)")
    p.add_argument("paths", nargs="+")
    p.add_argument("--aligned", action="store_true", help="each image is already an aligned face crop")
    p.add_argument("--json", action="store_true", help="one JSON object per face (default: text lines)")
    p.add_argument("--embedding", action="store_true", help="include the dense embedding (with --json)")
    p.add_argument("--selection", choices=["fused", "prefiqs"], default="fused",
                   help="what quality is (scoring.selection): fused (default) or PreFIQs alone")
    _common(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("run", help="run the agent (no arguments: the embedded demo clip)")
    p.add_argument("--config", type=Path, help="YAML configuration (see configs/)")
    p.add_argument("--source", help="video file or rtsp:// / http:// URL (overrides the configured camera's)")
    p.add_argument("--camera", help="camera id in logs, topics and messages (default: the configured one, else "
                                    "derived from --source: the file's stem, or the URL's host and path)")
    p.add_argument("--publish", help="ZeroMQ endpoint to publish on, e.g. tcp://127.0.0.1:5556")
    p.add_argument("--trace", type=Path, help="write every scored candidate and shot to this JSONL file")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("subscribe", help="receive best shots: one JSON line each, crops saved with --out")
    p.add_argument("endpoint", nargs="?", default="tcp://127.0.0.1:5556",
                   help="ZeroMQ tcp:// or ipc:// endpoint, or nats://HOST:PORT (several: comma-separated) for a "
                        "durable JetStream consumer that acks each shot once it is written")
    p.add_argument("--out", type=Path, help="write crops, metadata and embeddings under this folder")
    p.add_argument("--count", type=int, help="stop after this many messages")
    p.add_argument("--timeout", type=float, help="stop after this many seconds without a message")
    p.add_argument("--mode", choices=["sub", "pull"], default="sub", help="pull for a publisher in push mode")
    p.add_argument("--server-key", type=Path, help="the publisher's public .key file (CURVE)")
    p.add_argument("--client-key", type=Path, help="this client's .key_secret file (CURVE, mode 0600)")
    p.add_argument("--view", nargs="?", const="127.0.0.1:9109", metavar="HOST:PORT",
                   help="ZeroMQ: show the received shots on the live page at http://HOST:PORT/ (default "
                        "127.0.0.1:9109)")
    p.add_argument("--view-token-env", help="--view: environment variable holding the page's token (required off "
                   "loopback; HTTP basic auth password or Bearer)")
    p.add_argument("--view-allow-plaintext", action="store_true",
                   help="--view: serve faces over plain HTTP to other machines (with a token)")
    p.add_argument("--stream", default="BESTSHOT", help="NATS: the stream")
    p.add_argument("--durable", default="bestshot-subscribe", help="NATS: the durable consumer's name (kept on "
                   "the server: a restart goes on where the last run acked)")
    p.add_argument("--subjects", default="bestshot.>", help="NATS: subject filter, e.g. bestshot.site1.>")
    p.add_argument("--ack-wait", type=float, default=30.0, help="NATS: seconds before an unacked shot is resent")
    p.add_argument("--tls-ca", type=Path, help="NATS: CA bundle for tls:// servers")
    p.add_argument("--creds", type=Path, help="NATS: .creds file")
    p.add_argument("--nkey", type=Path, help="NATS: nkey seed file")
    p.add_argument("--token-env", help="NATS: environment variable holding the token (user and password: in the "
                   "URL, nats://user:password@host)")
    p.set_defaults(func=cmd_subscribe)

    default_shared = Path(__file__).resolve().parents[3] / "shared"
    ers = sub.add_parser("ers", help="embedding recognisability score")
    ers = ers.add_subparsers(dest="ers_command", required=True)
    p = ers.add_parser("calibrate", help="build the unrecognisable-identity centre and threshold for the FR model")
    p.add_argument("--shared", type=Path, default=default_shared, help="data folder with lfw/ and video/")
    p.add_argument("--captured", type=Path, help="crops saved by `bestshot subscribe --out` to add to the UIC")
    p.add_argument("--max-people", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    _common(p)
    p.set_defaults(func=cmd_ers_calibrate)

    ev = sub.add_parser("eval", help="quality evidence on the shared data (docs/QUALITY.md)")
    ev = ev.add_subparsers(dest="eval_command", required=True)
    recipes = "2:4/Bottleneck,2:4@0.75-1,unstructured:0.4"
    for name, func, helptext in [("pairs", cmd_eval_pairs, "EDC and pAUC on LFW DevTest pairs, clean and degraded"),
                                 ("tracks", cmd_eval_tracks, "best-shot selection on synthetic and real tracks")]:
        p = ev.add_parser(name, help=helptext)
        p.add_argument("--out", type=Path, default=Path("eval-out"))
        p.add_argument("--recipes", default=recipes, help="comma-separated PreFIQs recipes to compare")
        p.add_argument("--shared", type=Path, default=default_shared)
        p.add_argument("--seed", type=int, default=0)
        if name == "pairs":
            p.add_argument("--limit", type=int, help="at most this many matched and mismatched pairs (quick run)")
        else:
            p.add_argument("--synthetic", type=int, default=120, help="synthetic LFW tracks")
            p.add_argument("--natural", type=int, help="natural LFW tracks: people whose own photos make the frames "
                                                       "(default: all 144 test-split people with 4+ photos; 0: none)")
            p.add_argument("--no-video", action="store_true", help="skip the real clip")
            p.add_argument("--demo", action="store_true", help="also the embedded demo clip (its photos enrol)")
        p.add_argument("--threads", type=int)
        p.add_argument("--cache", type=Path)
        p.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                       help="the scoring graph's precision (int8: as `scoring.precision: int8` runs it)")
        _detector_args(p)
        p.set_defaults(func=func)
    p = ev.add_parser("templates", help="track templates vs best single frame vs plain mean (LFW pseudo-tracks)")
    p.add_argument("--shared", type=Path, default=default_shared)
    p.add_argument("--max-people", type=int, default=None)
    p.add_argument("--degraded", type=float, default=0.6,
                   help="share of frames degraded (0: the photos as they are, so pose and expression vary, no more)")
    _common(p)
    p.set_defaults(func=cmd_eval_templates)

    p = sub.add_parser("tune", help="choose the pruning recipe by evidence on a tuning split")
    p.add_argument("--out", type=Path, default=Path("tune-out"))
    p.add_argument("--recipes", help="comma-separated recipes (default: the built-in search list)")
    p.add_argument("--shared", type=Path, default=default_shared)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="at most this many tuning people (quick run)")
    p.add_argument("--selection", action="store_true",
                   help="fit the selection score's weights and probability instead (agent/quality/selection.py)")
    p.add_argument("--threads", type=int)
    p.add_argument("--cache", type=Path)
    _detector_args(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("curate", help="prune and clean a face set: one folder per identity in, a curated copy out")
    p.add_argument("dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--eps", type=float, default=0.03, help="probability difference under which shots are redundant")
    p.add_argument("--min-cos", type=float, default=0.92, help="... and embedding cosine over which they are")
    p.add_argument("--drop-unrecognisable", action="store_true", help="also remove faces the ERS rejects")
    _common(p)
    p.set_defaults(func=cmd_curate)

    p = sub.add_parser("check-config", help="validate a configuration file: every error with its location")
    p.add_argument("file", type=Path)
    p.set_defaults(func=cmd_check_config)
    config = sub.add_parser("config", help="configuration tools").add_subparsers(dest="config_command", required=True)
    config.add_parser("schema", help="print the configuration's JSON schema").set_defaults(func=cmd_config_schema)

    keys = sub.add_parser("keys", help="CURVE keys").add_subparsers(dest="keys_command", required=True)
    p = keys.add_parser("generate", help="write NAME.key (public) and NAME.key_secret (secret, mode 0600) in DIR")
    p.add_argument("dir", type=Path)
    p.add_argument("--name", default="bestshot")
    p.set_defaults(func=cmd_keys_generate)

    p = sub.add_parser("build-engines", help="build the dense and 2:4-sparse TensorRT engines (needs TensorRT)")
    p.add_argument("--config", type=Path, help="YAML configuration (models and engines sections)")
    p.set_defaults(func=cmd_build_engines)

    p = sub.add_parser("models", help="show the prepared models (prepares them if needed)")
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_models)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("score", help="faces/s and peak memory of the scoring forms, cv2.dnn as reference")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--faces", type=int, default=64, help="faces per measurement")
    p.add_argument("--backend", choices=["onnxruntime", "onnxruntime-cuda", "tensorrt"], default="onnxruntime",
                   help="GPU backends: faces/s at each batch for dense, sparse and the pair, and GPU memory")
    _common(p)
    p.set_defaults(func=cmd_bench_score)
    p = bench.add_parser("pipeline", help="frames/s, per-stage ms, CPU and memory of the whole pipeline on a file")
    p.add_argument("--source", help="video file (default: the embedded demo clip)")
    p.add_argument("--budget", type=float, default=None, help="scoring budget, faces/s (default unlimited)")
    p.add_argument("--detect-input", type=int, default=640, help="longest side the detector sees")
    p.add_argument("--detect-every", type=int, default=1, help="run the detector on every Nth frame")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compare-unlimited", action="store_true",
                   help="rerun with unlimited scoring and count the tracks whose published shot changes")
    p.set_defaults(func=cmd_bench_pipeline)
    p = bench.add_parser("outputs", help="shots/s and publish-to-ack latency of each output against real servers")
    p.add_argument("--count", type=int, default=2000, help="shots per output")
    p.add_argument("--window", type=int, default=64, help="shots outstanding (not yet acked) at most")
    p.add_argument("--nats", metavar="URL", help="a NATS server with JetStream (several: comma-separated)")
    p.add_argument("--nats-replicas", type=int, default=1, help="replicas of the bench stream (3 on a cluster)")
    p.add_argument("--mqtt", metavar="HOST:PORT", help="an MQTT broker")
    p.set_defaults(func=cmd_bench_outputs)
    p = bench.add_parser("cameras", help="the most cameras played at their frame rate that run without a dropped "
                                         "frame; per-stage time, CPU, latency, RSS, shots changed vs unpaced")
    p.add_argument("--source", action="append", help="video file, repeatable: camera i plays the (i mod k)th "
                                                     "(default: the embedded demo clip)")
    p.add_argument("--cameras", default="1-8", help="camera counts tried in order until one drops: 1-8 or 1,2,4")
    p.add_argument("--fps", type=float, default=15.0, help="frames per second each camera delivers")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of media per camera (clips loop)")
    p.add_argument("--budget", type=float, default=30.0, help="scoring budget, faces/s over all cameras")
    p.add_argument("--detect-input", type=int, default=640, help="longest side the detector sees")
    p.add_argument("--detect-every", type=int, default=1, help="run the detector on every Nth frame")
    p.add_argument("--threads", type=int, default=None)
    _detector_args(p)
    p.add_argument("--precision", choices=["fp32", "int8"], default="fp32", help="scoring.precision")
    p.add_argument("--json", help="also write the figures to this file")
    p.set_defaults(func=cmd_bench_cameras)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from agent.backends.base import BackendUnavailable
    from agent.common.cache import use_cache_root
    from agent.service.config import ConfigError
    from engines.gpu import GpuUnavailable
    from engines.trt_build import EngineError

    use_cache_root(getattr(args, "cache", None))
    try:
        return args.func(args)
    except ConfigError as e:
        for err in e.errors:
            log.error("%s: %s", e.source, err)
        return 2
    except (EngineError, BackendUnavailable, GpuUnavailable) as e:
        log.error("%s", e)
        return 1
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        log.error("%s", e)
        return 2
    except OSError as e:  # an address in use, a device gone: said in one line (systemd restarts on 1)
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
