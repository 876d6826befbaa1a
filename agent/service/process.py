"""The agent as a process: configuration -> models -> pipeline -> publisher, with signals.

SIGTERM/SIGINT stop the sources, flush every open track's best shot, close the sockets with a bounded
linger and return the run's summary; `bestshot run` exits 0 then, or 1 when every input failed for good
(RunSummary.every_input_failed).
"""

from __future__ import annotations

import logging
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent import __version__
from agent.common.cache import use_cache_root
from agent.common.keys import KeyFileError
from agent.pipeline.outputs.base import Output, Outputs
from agent.pipeline.outputs.mqtt import MqttConfig, MqttOutput
from agent.pipeline.outputs.nats import NatsConfig, NatsOutput
from agent.pipeline.outputs.zeromq import Publisher, PublisherConfig
from agent.pipeline.runner import Pipeline
from agent.pipeline.score import build_scorer
from agent.quality.diffprob import enrich_factory
from agent.quality.ers_builtin import int8_calibration
from agent.quality.selection import with_selection
from agent.service import notify
from agent.service.config import Config, ConfigError, load_config, to_camera
from agent.service.live import LiveView, PipelineStatus, read_token
from agent.service.metrics import Liveness, Metrics, serve
from agent.service.notify import Watchdog
from agent.types import BestShot

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    frames: int
    detections: int
    scored: int
    deferred: int  # faces the scoring budget passed over (a track's best of them is scored when it ends)
    published: int  # shots at least one output took (each shot once, however many outputs)
    dropped: int  # shots lost, counted per output that lost them
    seconds: float
    end_latency_ms_median: float | None  # tracks the tracker ended (unseen for max_lost_s)
    flush_latency_ms_median: float | None = None  # tracks a stream's end or the stop flushed
    inputs: int = 0  # cameras and upstream inputs that ran (once each, however often restarted)
    failed: dict[str, str] = field(default_factory=dict)  # camera -> why its input ended for good
    per_output: dict[str, int] = field(default_factory=dict)  # output name -> shots it took

    @property
    def every_input_failed(self) -> bool:
        """Nothing ran: each input failed for good (a missing or unreadable file, not a camera that is down: it is
        retried until stopped)."""
        return self.inputs > 0 and len(self.failed) == self.inputs


CLOSE_TIMEOUT_S = 10.0  # at the end, each output's time to deliver what it still holds (then: spool, or lost)


OUTPUT_CLASSES = {NatsConfig: NatsOutput, MqttConfig: MqttOutput, PublisherConfig: Publisher}  # config -> output


def open_outputs(configs: list[PublisherConfig | NatsConfig | MqttConfig]) -> Outputs:
    """Start every configured output; if one cannot start (an address in use, a spool held by another process),
    close those already started and raise."""
    started: list[Output] = []
    try:
        for c in configs:
            started.append(OUTPUT_CLASSES[type(c)](c))
    except BaseException:
        Outputs(started).close(1.0)
        raise
    return Outputs(started)


class Agent:
    """One running agent: owns the scorer, the pipeline and the publisher; shows its shots on `live` when given."""

    def __init__(self, cfg: Config, trace: Path | None = None, live: LiveView | None = None):
        self.cfg, self.live = cfg, live
        m = cfg.models
        use_cache_root(m.cache_dir)  # the detectors and the demo clip follow the FR model there
        int8 = int8_calibration(cfg.defaults.detector) if cfg.scoring.precision == "int8" else None
        self.scorer, self.prepared = build_scorer(m.fr, m.recipe, m.form, cfg.scoring.threads, cfg.scoring.max_batch,
                                                  m.cache_dir, cfg.backend, cfg.engines, int8)
        log.info("bestshot %s starting: model %s, %d camera(s)", __version__, self.scorer.model_id, len(cfg.cameras))
        for warning in cfg.warnings():
            log.warning("%s", warning)
        # ERS of the best shot, the track template and DiffProb's diverse shots
        ers = with_selection(self.scorer, self.prepared, cfg.defaults.detector, cfg.scoring.selection)
        enrich = enrich_factory(ers, cfg.scoring.shots, cfg.scoring.template_weights)
        self.outputs = open_outputs(cfg.output_configs())
        log.info("publishing on %s", self.outputs.describe())
        self.pipeline = Pipeline(cfg.camera_configs(), m.fr, self.scorer, self._publish, cfg.scoring.budget,
                                 trace=trace, tick=self.outputs.tick, enrich=enrich)
        if live is not None:
            live.status = PipelineStatus(self.pipeline)

    def _publish(self, shot: BestShot) -> bool:
        ok = self.outputs.publish(shot)
        log.info("camera %s track %d: %s shot, frame %d, quality %.3f (%d frames seen, %d scored)%s", shot.camera,
                 shot.track_id, shot.status, shot.frame_index, shot.quality, shot.frames_seen, shot.frames_scored,
                 "" if ok else " [dropped]")
        if self.live is not None:
            self.live.add_shot(shot)
        return ok

    def stop(self) -> None:
        self.pipeline.stop()

    def reload(self, path: Path) -> bool:
        """Apply a new configuration file's cameras: added ones start, removed ones stop (their open tracks
        flushed), changed ones restart; the others are not disturbed. An invalid file changes nothing."""
        notify.reloading()
        try:
            return self._reload(path)
        finally:
            notify.ready(f"{len(self.cfg.cameras)} camera(s), publishing on {self.outputs.describe()}")

    def _reload(self, path: Path) -> bool:
        try:
            new = load_config(path)
        except ConfigError as e:
            for err in e.errors:
                log.error("reload rejected: %s: %s", e.source, err)
            log.error("reload rejected: keeping the running configuration")
            return False
        for o in self.outputs.outputs:
            if isinstance(o, Publisher) and o.config.curve_secret_key is not None:
                try:
                    log.info("reload: %d authorized subscriber keys (%s)", o.reload_authorized_keys(), o.name)
                except KeyFileError as e:
                    log.error("reload: %s: %s (keeping the previous allow-list)", o.name, e)
        old = {c.id: c for c in self.cfg.cameras}
        cams = {c.id: c for c in new.cameras}
        removed = sorted(old.keys() - cams.keys())
        changed = sorted(i for i in old.keys() & cams.keys() if old[i] != cams[i])
        added = sorted(cams.keys() - old.keys())
        try:
            for cid in removed:
                self.pipeline.remove_camera(cid)
            for cid in changed + added:
                self.pipeline.add_camera(to_camera(cams[cid]))
        except (ValueError, FileNotFoundError) as e:
            log.error("reload: %s", e)
            return False
        self.pipeline.start_workers()
        ignored = [k for k in ("models", "backend", "scoring", "publisher", "outputs", "metrics", "live")
                   if getattr(new, k) != getattr(self.cfg, k)]
        if ignored:
            log.warning("reload: changes to %s take effect at the next restart", ", ".join(ignored))
        self.cfg = self.cfg.model_copy(update={"cameras": new.cameras, "defaults": new.defaults})
        log.info("reloaded %s: %d cameras added, %d removed, %d restarted, %d untouched", path, len(added),
                 len(removed), len(changed), len(cams) - len(added) - len(changed))
        return True

    def run(self) -> RunSummary:
        t0 = time.monotonic()
        try:
            self.pipeline.run()
        finally:
            self.outputs.close(CLOSE_TIMEOUT_S)
        workers = [*self.pipeline.finished, *self.pipeline.workers.values()]
        lat, flush = self.pipeline.end_latency_s, self.pipeline.flush_latency_s
        ended = self.pipeline.ended
        return RunSummary(
            frames=sum(w.frames for w in workers), detections=sum(w.detections for w in workers),
            scored=self.pipeline.scored, deferred=sum(g.deferred for w in workers for g in w.gates.values()),
            published=self.pipeline.published, dropped=self.outputs.dropped,
            seconds=time.monotonic() - t0,
            end_latency_ms_median=statistics.median(lat) * 1000 if lat else None,
            flush_latency_ms_median=statistics.median(flush) * 1000 if flush else None,
            inputs=len(ended), failed={cam: why for cam, why in ended.items() if why is not None},
            per_output={o.name: o.counts.published for o in self.outputs.outputs},
        )


def run_agent(cfg: Config, trace: Path | None = None, config_path: Path | None = None) -> RunSummary:
    """Run until the sources end (files) or a SIGTERM/SIGINT arrives; SIGHUP reloads `config_path`."""
    live = None
    if cfg.live.enabled:  # its token is read before any model loads: a missing one is a configuration error
        token = read_token(cfg.live.token.credential, cfg.live.token.env) if cfg.live.token else None
        live = LiveView(cfg.live.history, cfg.live.max_pages, token)
    agent = Agent(cfg, trace, live)

    def on_signal(signum, _frame) -> None:
        log.info("%s: stopping the sources and flushing open tracks", signal.Signals(signum).name)
        notify.stopping()
        agent.stop()

    def on_hup(_signum, _frame) -> None:
        if config_path is None:
            log.warning("SIGHUP: no configuration file to reload (started without --config)")
            return
        log.info("SIGHUP: reloading %s", config_path)
        threading.Thread(target=agent.reload, args=(config_path,), name="reload", daemon=True).start()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        signal.signal(signal.SIGHUP, on_hup)
    liveness = Liveness(agent.pipeline, outputs=agent.outputs)
    server = None
    if cfg.metrics.listen:
        registry = Metrics().bind(agent.pipeline, agent.outputs).registry
        if live is not None:
            registry.register(live)
            live.start()
        try:  # each live page holds a connection
            server = serve(cfg.metrics.listen, registry, liveness.health, pages=live,
                           max_connections=32 + (cfg.live.max_pages if live else 0))
        except OSError as e:
            raise OSError(f"metrics.listen {cfg.metrics.listen}: cannot listen: {e.strerror or e}") from e
    watchdog = Watchdog(liveness.problems).start()  # pings only under systemd, only while the loops live
    notify.ready(f"{len(cfg.cameras)} camera(s), publishing on {agent.outputs.describe()}")
    try:
        summary = agent.run()
    finally:
        watchdog.stop()
        if live is not None:
            live.close()
        if server is not None:
            server.shutdown()
            server.server_close()
    outputs = (f" ({', '.join(f'{name} {n}' for name, n in summary.per_output.items())})"
               if len(summary.per_output) > 1 else "")
    log.info("done: %d frames, %d faces detected, %d scored (%d deferred by the budget), %d shots published%s "
             "(%d dropped) in %.1f s; %d of %d input(s) failed", summary.frames, summary.detections, summary.scored,
             summary.deferred, summary.published, outputs, summary.dropped, summary.seconds, len(summary.failed),
             summary.inputs)
    return summary
