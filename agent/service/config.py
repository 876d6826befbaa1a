"""YAML configuration, validated into the stages' own dataclasses (pydantic checks them, unknown keys are errors).

    models:      FR model, pruning recipe, scoring form, cache dir
    backend:     auto | onnxruntime | onnxruntime-cuda | tensorrt
    scoring:     batch size, per-second scoring budget
    defaults:    source / detector / tracker / selection settings shared by every camera
    cameras:     [{id, url | upstream, and any per-camera override of a `defaults` section}]
    publisher:   endpoint, mode, high-water mark, CURVE keys, spool; off loopback, CURVE or allow_plaintext
    outputs:     [{type: zeromq | nats | mqtt, name, ...}]: more outputs at once; `publisher` is one of them when set
                 or when `outputs` is empty (agent/pipeline/outputs/base.py)
    metrics:     Prometheus listen address
    live:        the live page on the metrics listener: off unless enabled; off loopback, a token and allow_plaintext
    logging:     level

`${NAME}` (or `${NAME:-default}`) in any string is replaced from the environment, for secrets.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TextIO
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.common.fr_spec import FRSpec
from agent.common.secrets import Secret
from agent.pipeline.detect import DetectorSpec, detector_problem
from agent.pipeline.outputs.exposure import in_clear
from agent.pipeline.outputs.mqtt import MqttConfig
from agent.pipeline.outputs.nats import NatsConfig, StreamSettings
from agent.pipeline.outputs.zeromq import PublisherConfig
from agent.pipeline.runner import CameraConfig
from agent.pipeline.select import SelectionConfig
from agent.pipeline.sources.upstream import UpstreamOptions
from agent.pipeline.sources.video import SourceOptions
from agent.pipeline.track import TrackerConfig
from agent.service.live import exposure_problems
from engines.recipe import Recipe
from engines.trt_build import EngineOptions, Profile

STRICT = ConfigDict(extra="forbid")
for _cls in (DetectorSpec, SourceOptions, FRSpec, PublisherConfig, SelectionConfig, TrackerConfig, UpstreamOptions,
             EngineOptions, Profile, NatsConfig, StreamSettings, Secret, MqttConfig):
    _cls.__pydantic_config__ = STRICT  # unknown keys in a section are errors, with their location


class ConfigError(Exception):
    """A configuration that cannot be used; `errors` holds one 'location: message' line per problem."""

    def __init__(self, source: str, errors: list[str]):
        self.source, self.errors = source, errors
        super().__init__(f"{source}: " + "; ".join(errors))


class Model(BaseModel):
    model_config = STRICT


class Models(Model):
    fr: FRSpec = Field(default_factory=FRSpec)
    recipe: str | None = Field(None, description="pruning recipe of the twin; null = the FR model's default "
                               "(2:4/Bottleneck for the built-in FaceNet, 2:4@0.75-1 for others)")
    form: Literal["trunk", "separate"] = "trunk"
    cache_dir: Path | None = None

    @field_validator("recipe")
    @classmethod
    def _recipe(cls, v: str | None) -> str | None:
        if v is not None:
            Recipe.parse(v)
        return v


class Scoring(Model):
    max_batch: int = Field(32, ge=1, le=1024)
    budget: float | None = Field(None, gt=0, description="faces scored per second, all cameras; null = unlimited")
    threads: int | None = Field(None, ge=1)
    shots: int = Field(1, ge=1, le=32, description="diverse shots per message, chosen by DiffProb (extra.shots)")
    template_weights: Literal["ers", "quality", "mean"] = "ers"
    selection: Literal["fused", "prefiqs"] = Field(
        "fused", description="what `quality` is: fused = PreFIQs with ERS, activation statistics and the detector, "
                             "as the chance of a match at FMR 1e-3 (agent/quality/selection.py); prefiqs = Q alone")
    precision: Literal["fp32", "int8"] = Field(
        "fp32", description="int8: the shared-trunk graph quantized to INT8 (calibrated on the packaged faces), on "
                            "ONNX Runtime's CPU backend; about twice as fast there (docs/PERFORMANCE.md)")


class Defaults(Model):
    source: SourceOptions = Field(default_factory=SourceOptions)
    detector: DetectorSpec = Field(default_factory=DetectorSpec)
    tracker: TrackerConfig = Field(default_factory=TrackerConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    detect_every: int = Field(1, ge=1)
    context_margin: float = Field(0.5, ge=0)


CAMERA_ID = re.compile(r"^[A-Za-z0-9_.-]+$")  # safe in ZeroMQ topics (bestshot.<camera>), file names and labels


class Camera(Defaults):
    id: str = Field(min_length=1, pattern=CAMERA_ID.pattern)
    url: str | None = None
    upstream: UpstreamOptions | None = None

    @model_validator(mode="after")
    def _one_input(self) -> Camera:
        if (self.url is None) == (self.upstream is None):
            raise ValueError("a camera needs exactly one of `url` or `upstream`")
        return self


class Curve(Model):
    server_secret_key: Path = Field(description="the publisher's secret key file (bestshot keys generate)")
    authorized_keys_dir: Path = Field(description="folder of allowed subscribers' public key files")


class Spool(Model):
    dir: Path
    max_mb: float = Field(256, gt=0)


class Publisher(Model):
    endpoint: str = "tcp://127.0.0.1:5556"
    mode: Literal["pub", "push"] = "pub"
    sndhwm: int = Field(1000, ge=1)
    include_embedding: bool = True
    jpeg_quality: int = Field(90, ge=1, le=100)
    linger_ms: int = Field(1000, ge=0)
    curve: Curve | None = None
    spool: Spool | None = None
    allow_plaintext: bool = Field(False, description="publish without CURVE on an address other than loopback: "
                                  "faces in clear on the network (refused unless true; a warning at every start)")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if not re.match(r"^(tcp://([^:/\s\[\]]+|\[[0-9A-Fa-f:.]+\]):(\d+|\*)|ipc://\S+)$", v):
            raise ValueError("expected tcp://HOST:PORT, tcp://[IPV6]:PORT or ipc:///PATH")
        return v

    @model_validator(mode="after")
    def _spool_needs_push(self) -> Publisher:
        if self.spool is not None and self.mode != "push":
            raise ValueError("a spool needs mode: push (PUB drops for slow subscribers without telling the sender)")
        return self

    def plaintext_exposure(self) -> str | None:
        """What is wrong when best shots would leave this machine unencrypted (agent/pipeline/outputs/exposure.py),
        else None."""
        if not in_clear(self.endpoint, encrypted=self.curve is not None):
            return None
        return (f"publisher.endpoint {self.endpoint} can be reached from other machines and publisher.curve is not "
                "set: best shots (faces, biometric data) would cross the network unencrypted")

    @model_validator(mode="after")
    def _no_faces_in_clear(self) -> Publisher:
        if not self.allow_plaintext and (problem := self.plaintext_exposure()):
            raise ValueError(f"{problem}; set publisher.curve (keys: bestshot keys generate), bind to 127.0.0.1, "
                             "or accept it with publisher.allow_plaintext: true")
        return self


class ZeroMQOutput(Publisher):
    """A ZeroMQ output in `outputs:`, configured as `publisher:` is."""

    type: Literal["zeromq"]
    name: str = "zeromq"


class Metrics(Model):
    listen: str | None = Field("127.0.0.1:9108", description="HOST:PORT for /metrics and /healthz; null = off")

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[^:\s]*:\d{1,5}$", v):
            raise ValueError("expected HOST:PORT")
        return v


class LiveToken(Model):
    """Where the live page's token comes from: never the YAML itself."""

    credential: str | None = Field(None, description="file name in $CREDENTIALS_DIRECTORY (systemd LoadCredential=)")
    env: str | None = Field(None, description="environment variable holding it")

    @model_validator(mode="after")
    def _one_source(self) -> LiveToken:
        if (self.credential is None) == (self.env is None):
            raise ValueError("name exactly one of `credential` or `env`")
        return self


class Live(Model):
    enabled: bool = Field(False, description="serve the live page (faces) on metrics.listen at /")
    history: int = Field(20, ge=1, le=500, description="shots kept per camera, in memory only")
    max_pages: int = Field(100, ge=1, le=1000, description="pages connected at once")
    token: LiveToken | None = Field(None, description="required of every request when set (HTTP basic auth "
                                    "password or Bearer); required off loopback")
    allow_plaintext: bool = Field(False, description="serve faces over plain HTTP to other machines (off loopback "
                                  "refused unless true; a warning at every start)")


class Logging(Model):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Config(Model):
    models: Models = Field(default_factory=Models)
    backend: Literal["auto", "onnxruntime", "onnxruntime-cuda", "tensorrt"] = "auto"
    engines: EngineOptions = Field(default_factory=EngineOptions)  # TensorRT builds (bestshot build-engines)
    scoring: Scoring = Field(default_factory=Scoring)
    defaults: Defaults = Field(default_factory=Defaults)
    cameras: list[Camera] = Field(min_length=1)
    publisher: Publisher = Field(default_factory=Publisher)
    outputs: list[Annotated[ZeroMQOutput | NatsConfig | MqttConfig, Field(discriminator="type")]] = Field(
        default_factory=list, description="outputs besides (or instead of) publisher")
    metrics: Metrics = Field(default_factory=Metrics)
    live: Live = Field(default_factory=Live)
    logging: Logging = Field(default_factory=Logging)

    def warnings(self) -> list[str]:
        """What this valid configuration accepts explicitly but should not need: logged at every start and printed by
        check-config (each output that sends faces in clear because its allow_plaintext says so)."""
        problem = self.publisher.plaintext_exposure()  # only valid with allow_plaintext
        out = [f"{problem} (accepted by publisher.allow_plaintext: true)"] if problem else []
        out += [f"{problem} (accepted by its allow_plaintext: true)" for o in self.outputs
                if (problem := o.plaintext_exposure())]
        if self.live.enabled and exposure_problems(self.metrics.listen, True, False):
            out.append(f"live page on {self.metrics.listen}: faces in clear over HTTP to other machines (accepted by "
                       "live.allow_plaintext: true)")
        return out

    def output_configs(self) -> list[PublisherConfig | NatsConfig | MqttConfig]:
        """Every output to start: `publisher` first when it is set or `outputs` is empty, then `outputs`."""
        out: list[PublisherConfig | NatsConfig | MqttConfig] = []
        if "publisher" in self.model_fields_set or not self.outputs:
            out.append(self.publisher_config())
        for o in self.outputs:
            out.append(zeromq_config(o) if isinstance(o, ZeroMQOutput) else o)
        return out

    def camera_configs(self) -> list[CameraConfig]:
        return [to_camera(c) for c in self.cameras]

    def publisher_config(self) -> PublisherConfig:
        return zeromq_config(self.publisher)


def zeromq_config(p: Publisher) -> PublisherConfig:
    extra: dict[str, Any] = {"name": p.name} if isinstance(p, ZeroMQOutput) else {}
    if p.curve is not None:
        extra |= {"curve_secret_key": p.curve.server_secret_key,
                  "curve_authorized_keys_dir": p.curve.authorized_keys_dir}
    if p.spool is not None:
        extra |= {"spool_dir": p.spool.dir, "spool_max_bytes": int(p.spool.max_mb * 2**20)}
    return PublisherConfig(endpoint=p.endpoint, mode=p.mode, sndhwm=p.sndhwm, include_embedding=p.include_embedding,
                           jpeg_quality=p.jpeg_quality, linger_ms=p.linger_ms, **extra)


def to_camera(c: Camera) -> CameraConfig:
    return CameraConfig(id=c.id, url=c.url, upstream=c.upstream, source=c.source, detector=c.detector,
                        tracker=c.tracker, selection=c.selection, detect_every=c.detect_every,
                        context_margin=c.context_margin)


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any, where: str, errors: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k), errors) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{where}[{i}]", errors) for i, v in enumerate(value)]
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            if m[1] in os.environ:
                return os.environ[m[1]]
            if m[2] is not None:
                return m[2]
            errors.append(f"{where}: environment variable {m[1]} is not set")
            return ""
        return _ENV.sub(sub, value)
    return value


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _loc(loc: tuple) -> str:
    s = ""
    for part in loc:
        if isinstance(part, int):
            s += f"[{part}]"
        elif not str(part).startswith(("function-", "function-after", "json-or-python")):
            s += f".{part}" if s else str(part)
    return s or "(top level)"


def _negatives(section: Any, where: str) -> list[str]:
    """Negative numbers in a stage's dataclass (none of their counts, sizes, times or thresholds can be)."""
    out = []
    for f in fields(section):
        v = getattr(section, f.name)
        if is_dataclass(v):
            out += _negatives(v, f"{where}.{f.name}")
        elif isinstance(v, int | float) and not isinstance(v, bool) and v < 0:
            out.append(f"{where}.{f.name}: must not be negative, got {v}")
    return out


def _problems(cfg: Config) -> list[str]:
    """What the models cannot check on their own: unique camera ids, no negative numbers in the stages' settings,
    each camera's detector model, where the live page may listen."""
    errors, first = [], {}
    if cfg.live.enabled and cfg.metrics.listen is None:
        errors.append("live.enabled: the live page is served on metrics.listen, which is null")
    elif cfg.live.enabled:
        errors += exposure_problems(cfg.metrics.listen, cfg.live.token is not None, cfg.live.allow_plaintext)
    for where, sec in [("defaults", cfg.defaults), *((f"cameras[{i}]", c) for i, c in enumerate(cfg.cameras))]:
        for name in ("source", "detector", "tracker", "selection", "upstream"):
            if getattr(sec, name, None) is not None:
                errors += _negatives(getattr(sec, name), f"{where}.{name}")
    for i, cam in enumerate(cfg.cameras):
        if cam.upstream is None and (why := detector_problem(cam.detector)):
            errors.append(f"cameras[{i}].detector.path: {why}")
        if cam.id in first:
            errors.append(f"cameras[{i}].id: camera id {cam.id!r} is already used by cameras[{first[cam.id]}]")
        first.setdefault(cam.id, i)
    if cfg.scoring.precision == "int8" and (cfg.backend not in ("auto", "onnxruntime") or cfg.models.form != "trunk"):
        errors.append(f"scoring.precision: int8 runs the shared-trunk graph on ONNX Runtime's CPU backend; backend "
                      f"{cfg.backend!r} and models.form {cfg.models.form!r} need fp32")
    names = [o.name for o in cfg.output_configs()]
    errors += [f"outputs: two outputs are named {n!r} (give each its own `name`)" for n in sorted(set(names))
               if names.count(n) > 1]
    return errors


def _message(err: dict) -> str:
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return "unknown key"
    return err["msg"].removeprefix("Value error, ")


def parse_config(data: Any, source: str = "config") -> Config:
    """Validate a parsed YAML document; raises ConfigError listing every problem with its location."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"(top level): expected a mapping of sections, got {type(data).__name__}"])
    errors: list[str] = []
    data = expand_env(data, "", errors)
    defaults = data.get("defaults") or {}
    cams = data.get("cameras")
    if isinstance(defaults, dict) and isinstance(cams, list):
        data = {**data, "cameras": [_merge(defaults, c) if isinstance(c, dict) else c for c in cams]}
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        errors += [f"{_loc(err['loc'])}: {_message(err)}" for err in e.errors()]
        raise ConfigError(source, errors) from None
    errors += _problems(cfg)
    if errors:
        raise ConfigError(source, errors)
    return cfg


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(str(path), [f"cannot read: {e.strerror or e}"]) from e
    try:
        data = yaml.load(text, _StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(yaml)"
        raise ConfigError(str(path), [f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}"]) from e
    return parse_config(data, str(path))


def check_config(path: str | Path, out: TextIO) -> int:
    """`bestshot check-config`: every problem as `path: location: message`, one per line; 0 when valid (then any
    warning as `path: warning: message`), else 2."""
    try:
        cfg = load_config(path)
    except ConfigError as e:
        out.writelines(f"{e.source}: {err}\n" for err in e.errors)
        return 2
    out.write(f"{path}: ok, {len(cfg.cameras)} camera(s): {', '.join(c.id for c in cfg.cameras)}\n")
    out.writelines(f"{path}: warning: {w}\n" for w in cfg.warnings())
    return 0


def config_schema() -> dict:
    return Config.model_json_schema()


def schema_json() -> str:
    """`bestshot config schema`: the JSON schema of the configuration file."""
    return json.dumps(config_schema(), indent=2) + "\n"


def default_config(source: str, camera: str) -> dict:
    """The configuration `bestshot run` uses with no file: one camera `camera` reading `source`."""
    return {"cameras": [{"id": camera, "url": source}]}


def derive_camera_id(source: str, limit: int = 64) -> str:
    """A camera id for `source`: a file's stem, or a URL's host and path (no credentials, port or query), with every
    run of other characters than CAMERA_ID's replaced by `_`, at most `limit` characters; `camera` if nothing is
    left."""
    name = Path(source).stem
    if "://" in source:
        parts = urlsplit(source)
        name = f"{parts.hostname or ''}{parts.path}" if parts.netloc else Path(parts.path).stem  # file:///...
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.-")[:limit].rstrip("_.-")
    return name or "camera"

