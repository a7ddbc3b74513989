"""The config's sections: one dataclass each, defaults and their reasons beside each key, and a
`check()` that refuses an impossible value with one line naming the key. engine.core.config
loads the TOML into them (unknown keys and wrong types are refused there).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.core.errors import ConfigError
from engine.core.request import EVENT_KINDS


@dataclass
class DataConfig:
    source: str = "synthetic"          # synthetic | movielens | files
    seed: int = 7
    n_users: int = 2000
    n_items: int = 5000
    n_categories: int = 20
    n_authors: int = 300
    latent_dim: int = 16
    content_dim: int = 32
    days: float = 30.0
    impressions_per_user: int = 100    # mean logged impressions per user over the log
    cold_share: float = 0.05           # items created after the log ends: no interactions
    history_frac: float = 0.7          # two-tower training and feature state: first 70% of time
    valid_frac: float = 0.15           # validation: the last 15%; rankers train in between
    movielens_dir: str = ""            # source = movielens; empty: the `recserve data fetch` cache
    files_dir: str = ""                # source = files: interactions, items[, users] (.parquet|.csv); docs/data.md
    split: str = "global"              # global: by time (the fractions above) | per_user: held_out per user
    held_out: float = 0.2              # per_user: each user's latest share of interactions held out

    def check(self) -> None:
        _one_of("source", self.source, ("synthetic", "movielens", "files"))
        if self.source == "files" and not self.files_dir:
            raise _err("files_dir", "source = files needs the folder of interactions, items[, users]")
        _one_of("split", self.split, ("global", "per_user"))
        if not 0 < self.held_out < 1:
            raise _err("held_out", f"must be in (0, 1), got {self.held_out}")
        if self.split == "per_user" and self.source == "synthetic":
            raise _err("split", "per_user needs a source without ground truth: a synthetic world is scored "
                                "by its truth on the state at the end of the log")
        for k in ("n_users", "n_items", "n_categories", "n_authors", "latent_dim", "content_dim",
                  "impressions_per_user"):
            _positive(k, getattr(self, k))
        _unit("cold_share", self.cold_share)
        if not (0 < self.history_frac < 1 and 0 < self.valid_frac < 1
                and self.history_frac + self.valid_frac < 1):
            raise _err("history_frac", "history_frac + valid_frac must leave room for ranker training")


@dataclass
class TrainConfig:
    seed: int = 11
    embed_dim: int = 32                # two-tower output, shared item embedding
    id_dim: int = 32                   # id-embedding tables (the sparse part)
    recent_len: int = 20               # user's recent positive items kept and pooled
    batch_size: int = 1024
    lr: float = 3e-3
    tt_epochs: int = 3
    tt_temperature: float = 0.05
    tt_id_dropout: float = 0.3         # masks item ids in training so cold items embed from content
    tt_uniform_negatives: int = 1024   # extra negatives per batch drawn uniformly from the catalog (MNS)
    tt_logq: float = 1.0               # weight of the logQ correction of the sampled softmax
    gbdt_trees: int = 40
    gbdt_leaves: int = 15
    gbdt_lr: float = 0.15
    dnn_hidden: list[int] = field(default_factory=lambda: [128])
    dnn_epochs: int = 3
    fine_experts: int = 4
    fine_expert_hidden: list[int] = field(default_factory=lambda: [128, 64])
    fine_tower_hidden: list[int] = field(default_factory=lambda: [32])
    fine_epochs: int = 4
    max_rank_rows: int = 0             # 0: all ranker-window impressions; else a sample
    rank_cold_share: float = 0.0       # ranker rows re-featurized as cold items (no id row, no counters)
    distill_weight: float = 0.0        # coarse DNN: weight of the listwise loss towards the fine ranker (0: off)
    distill_users: int = 2000          # training users whose offline recall the fine ranker scores
    position_bias: int = 32            # slots whose examination the rankers learn apart (PAL; 0: off)
    parity_tol: float = 1e-4

    def check(self) -> None:
        for k in ("embed_dim", "id_dim", "recent_len", "batch_size", "tt_epochs", "gbdt_trees",
                  "gbdt_leaves", "dnn_epochs", "fine_experts", "fine_epochs"):
            _positive(k, getattr(self, k))
        if self.gbdt_leaves < 2:
            raise _err("gbdt_leaves", "must be >= 2")
        for k in ("dnn_hidden", "fine_expert_hidden", "fine_tower_hidden"):
            v = getattr(self, k)
            if not v or any(h <= 0 for h in v):
                raise _err(k, "needs one or more positive layer widths")
        if len(self.dnn_hidden) > 2:
            raise _err("dnn_hidden", "coarse phase 2 is shallow: 1 or 2 hidden layers")
        _unit("tt_id_dropout", self.tt_id_dropout)
        _unit("tt_logq", self.tt_logq)
        _unit("rank_cold_share", self.rank_cold_share)
        if self.distill_weight < 0 or self.distill_users < 1:
            raise _err("distill_weight", "distill_weight must be >= 0 and distill_users >= 1")
        _non_negative("tt_uniform_negatives", self.tt_uniform_negatives)
        if self.position_bias == 1 or self.position_bias < 0:
            raise _err("position_bias", "0 (off) or the number of slots, >= 2")


@dataclass
class IndexConfig:
    kind: str = "flat"                 # flat | ivf_flat | ivf_sq8
    nlist: int = 1024
    nprobe: int = 32
    train_size: int = 100_000          # vectors sampled to train the coarse quantizer
    recall_k: int = 1000               # recall@k against exact search, stored in the manifest
    recall_queries: int = 200

    def check(self) -> None:
        _one_of("kind", self.kind, ("flat", "ivf_flat", "ivf_sq8"))
        for k in ("nlist", "nprobe", "train_size", "recall_k", "recall_queries"):
            _positive(k, getattr(self, k))
        if self.nprobe > self.nlist:
            raise _err("nprobe", f"{self.nprobe} exceeds nlist={self.nlist}")


@dataclass
class I2IConfig:
    """The item-to-item neighbour table (model_export.i2i) behind the recall_i2i route and the
    rankers' i2i feature; built from the first task's positives of the training rows."""
    method: str = "auto"               # auto | ease | cosine
    neighbours: int = 200              # kept per item, largest |weight| first; 0: no table (i2i feature 0)
    decay: float = 0.95                # the user's r-th most recent item weighs decay ** r
    ease_lambda: float = 300.0         # EASE's L2 penalty
    ease_max_items: int = 3000         # auto: EASE (a dense inverse) up to this catalog size, cosine above

    def check(self) -> None:
        _one_of("method", self.method, ("auto", "ease", "cosine"))
        _non_negative("neighbours", self.neighbours)
        if not 0 < self.decay <= 1:
            raise _err("decay", f"must be in (0, 1], got {self.decay}")
        _positive("ease_lambda", self.ease_lambda)
        _positive("ease_max_items", self.ease_max_items)


@dataclass
class ImplicitConfig:
    """Ranker rows for data without impressions (model_export.implicit): per user, the items the
    offline recall returns at the user's cut, labelled by the rank rows, plus sampled negatives."""
    candidates: float = 1.0            # share of each user's recalled candidates kept as rows
    uniform: float = 0.0               # uniform items the user never interacted with, per positive
    popular: float = 0.0               # popularity^0.75-weighted such items, per positive
    positives: str = "recalled"        # recalled | all: also the interactions recall missed

    def check(self) -> None:
        _unit("candidates", self.candidates)
        for k in ("uniform", "popular"):
            _non_negative(k, getattr(self, k))
        _one_of("positives", self.positives, ("recalled", "all"))
        if self.candidates == 0 and self.uniform == 0 and self.popular == 0:
            raise _err("candidates", "no negatives: keep candidates or sample uniform or popular items")


@dataclass
class ServingConfig:
    ort_threads: int = 1               # per worker: N workers x 1 thread fill 2 cores without contention
    faiss_threads: int = 1
    lgbm_threads: int = 1
    tree_runtime: str = "lleaves"      # lleaves (compiled, ~4.7x faster) | native (LightGBM predict)
    route_threads: int = 4             # recall routes run concurrently (faiss and ORT release the GIL)
    default_count: int = 20
    max_count: int = 200
    max_excludes: int = 1000
    deadline_ms: float = 100.0         # each call's budget from its arrival (queueing counts); a shorter client deadline wins
    on_deadline: str = "degrade"       # degrade: answer on coarse scores | error: DEADLINE_EXCEEDED
    max_inflight: int = 64             # per worker; beyond it RESOURCE_EXHAUSTED at once
    max_queue_ms: float = 50.0         # admission: a call expected to wait longer for a worker is refused...
    queue_burst_ms: float = 100.0      # ...once that wait has stood this long (a burst queues; 0: refuse at once)
    seen_window: int = 200             # recent impressions per user remembered as seen
    hot_half_life_hours: float = 24.0
    workers: int = 2
    worker_nice: int = 5               # native workers run this much nicer than the front, which then refuses at once under load
    snapshot_s: float = 60.0           # embedded store with --state-dir: snapshot period
    event_buffer: int = 100_000        # Redis store: events held while Redis is down, then RESOURCE_EXHAUSTED

    def check(self) -> None:
        for k in ("ort_threads", "faiss_threads", "lgbm_threads", "route_threads", "default_count",
                  "max_count", "max_inflight", "seen_window", "workers", "snapshot_s", "event_buffer"):
            _positive(k, getattr(self, k))
        if self.default_count > self.max_count:
            raise _err("default_count", f"{self.default_count} exceeds max_count={self.max_count}")
        if self.deadline_ms <= 0:
            raise _err("deadline_ms", "must be > 0")
        if self.max_queue_ms <= 0:
            raise _err("max_queue_ms", "must be > 0")
        _non_negative("queue_burst_ms", self.queue_burst_ms)
        if not 0 <= self.worker_nice <= 19:
            raise _err("worker_nice", f"{self.worker_nice} is not a niceness increment in 0..19")
        if self.hot_half_life_hours <= 0:
            raise _err("hot_half_life_hours", "must be > 0")
        _one_of("on_deadline", self.on_deadline, ("degrade", "error"))
        _one_of("tree_runtime", self.tree_runtime, ("lleaves", "native"))


@dataclass
class RayConfig:
    """`recserve serve --backend ray` only (engine.app.ray_app); the native server ignores it."""
    num_cpus: float = 1.0              # CPUs a replica reserves: one engine is one GIL, ~one core
    max_ongoing_requests: int = 8      # per replica, like the native worker's handler threads
    max_queued_requests: int = 64      # per proxy beyond the replicas' slots: then RESOURCE_EXHAUSTED
    target_ongoing_requests: float = 2.0  # --autoscale: replicas are added above this many per replica
    split_fine: bool = False           # fine ranker in its own deployment, batched across requests
    fine_replicas: int = 1
    fine_num_cpus: float = 1.0
    fine_max_batch: int = 8            # requests per ONNX call of the fine ranker deployment
    fine_batch_wait_ms: float = 2.0    # how long a batch waits to fill
    access_log: bool = False           # Serve's per-request log lines in proxy and replicas: CPU per call

    def check(self) -> None:
        for k in ("max_ongoing_requests", "max_queued_requests", "fine_replicas", "fine_max_batch"):
            _positive(k, getattr(self, k))
        for k in ("num_cpus", "fine_num_cpus", "fine_batch_wait_ms"):
            _non_negative(k, getattr(self, k))
        if self.target_ongoing_requests <= 0:
            raise _err("target_ongoing_requests", "must be > 0")


@dataclass
class LogConfig:
    """The sample log: every served item with its ranker inputs, and every accepted event,
    written before the answer (engine.app.samplelog; docs/data.md says what survives what)."""
    backend: str = "files"             # files (segments in `dir`) | redis (streams) | off
    dir: str = ""                      # files: empty = <default state dir of the bundle root>/samples
    redis_url: str = ""                # redis: redis://HOST:PORT/DB[?prefix=P], e.g. the feature store's Redis
    segment_mb: float = 64.0           # files: a segment is closed past this size ...
    segment_s: float = 300.0           # ... or this age, and the next one started
    fsync_s: float = 1.0               # files: fsync period (power loss costs at most this); 0: every append
    batch_ms: float = 200.0            # files: raw records get their Arrow batch this often, off the request path
    retain_hours: float = 72.0         # files: closed segments older than this are deleted; 0: kept
    retain_gb: float = 20.0            # files: and the oldest past this total per stream; 0: unbounded
    stream_maxlen: int = 1_000_000     # redis: XADD MAXLEN ~ this per stream (trim policy: docs/data.md)
    buffer: int = 10_000               # redis: entries held while Redis is unreachable, then the oldest dropped

    def check(self) -> None:
        _one_of("backend", self.backend, ("files", "redis", "off"))
        if self.backend == "redis" and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise _err("redis_url", "backend redis needs redis://HOST:PORT/DB (e.g. the feature store's Redis)")
        for k in ("segment_mb", "segment_s", "batch_ms", "stream_maxlen", "buffer"):
            _positive(k, getattr(self, k))
        for k in ("fsync_s", "retain_hours", "retain_gb"):
            _non_negative(k, getattr(self, k))


@dataclass
class JoinConfig:
    """The label join (model_export.join): impressions joined to events within a window."""
    window_s: float = 1800.0           # an impression waits this long (joiner clock) for its events
    late_s: float = 21600.0            # after its window: a positive still re-emits it as a correction
    skew_s: float = 30.0               # events without request_id may carry a time this much before the impression
    positive_kinds: list[str] = field(default_factory=lambda: ["click", "like", "finish"])
    commit_s: float = 5.0              # how often output and input offsets are committed together
    segment_mb: float = 64.0           # output segments rotate past this size

    def check(self) -> None:
        for k in ("window_s", "commit_s", "segment_mb"):
            _positive(k, getattr(self, k))
        for k in ("late_s", "skew_s"):
            _non_negative(k, getattr(self, k))
        for kind in self.positive_kinds:
            _one_of("positive_kinds", kind, EVENT_KINDS)
        if not self.positive_kinds:
            raise _err("positive_kinds", "name at least one event kind")


@dataclass
class StreamConfig:
    """The streaming trainer (`recserve train --follow`, model_export.stream): joined samples
    in, one pass through a small shuffle buffer, a validated bundle version out every so often."""
    models: list[str] = field(default_factory=lambda: ["coarse_dnn", "fine", "id_embeddings"])
    publish_rows: int = 20_000         # publish after this many newly trained samples ...
    publish_s: float = 20.0            # ... or this many seconds, whichever comes first
    min_rows: int = 1000               # never publish a version trained on fewer new samples
    buffer_rows: int = 4096            # shuffle buffer: rows are shuffled within chunks this large, once
    batch_size: int = 256
    lr: float = 1e-3                   # Adam, dense rankers
    emb_optimizer: str = "adam"        # the id-embedding rows (id_embeddings): "adam" (sparse) or "adagrad"
    emb_lr: float = 3e-3               # their learning rate (the build's; Adagrad wants ~10x more)
    position_bias: bool = False        # train the rankers' examination curves on the served slots too (docs/loop.md)
    holdout_rows: int = 2000           # freshest samples held out to validate a candidate (trained on next)
    min_holdout_positives: int = 30    # and at least this many primary-task positives among them
    auc_margin: float = 0.02           # refused when a model's AUC falls more than this below the serving one
    keep_versions: int = 8             # streamed versions kept (with their checkpoints); the base is kept
    poll_s: float = 0.5                # follow mode: wait this long when no new samples were committed

    def check(self) -> None:
        for m in self.models:
            _one_of("models", m, ("coarse_dnn", "fine", "id_embeddings"))
        _one_of("emb_optimizer", self.emb_optimizer, ("adam", "adagrad"))
        if not self.models:
            raise _err("models", "name at least one of coarse_dnn, fine, id_embeddings")
        for k in ("publish_rows", "publish_s", "buffer_rows", "batch_size", "lr", "emb_lr", "holdout_rows",
                  "keep_versions", "poll_s"):
            _positive(k, getattr(self, k))
        for k in ("min_rows", "min_holdout_positives", "auc_margin"):
            _non_negative(k, getattr(self, k))


@dataclass
class SimulateConfig:
    """The closed-loop simulator (`recserve simulate`, loadtest.simulate): synthetic users of the
    world against two servers, a frozen bundle and the one the streaming trainer publishes.

    The time scale comes from the users: `active_users` are online (drawn by logged activity),
    each asking for a list `user_rpm` times per simulated minute, and the machine serves `qps`
    calls per wall second to each arm, so one simulated minute lasts
    active_users * user_rpm / qps wall seconds (`minute_s`)."""
    active_users: int = 200            # users online during the run
    user_rpm: float = 2.0              # lists each asks for per simulated minute (one per 30 s of scrolling)
    qps: float = 8.0                   # Recommend calls per wall second, the same users to both arms
    drift_at: float = 0.4              # share of the run after which the world drifts (10 of 25 minutes)
    threads: int = 4                   # simulated users in flight at once
    count: int = 20                    # list length asked for
    shift_share: float = 0.5           # users whose interests shift at the drift
    launch_quality: float = 1.5        # quality the launched items (the world's cold items) gain at the drift
    window_s: float = 10.0             # join window of the streaming loop (users answer within seconds)
    commit_s: float = 1.0              # joiner commit period of the streaming loop
    seed: int = 0

    @property
    def minute_s(self) -> float:
        return self.active_users * self.user_rpm / self.qps

    def check(self) -> None:
        for k in ("active_users", "user_rpm", "qps", "threads", "count", "window_s", "commit_s"):
            _positive(k, getattr(self, k))
        for k in ("drift_at", "shift_share"):
            _unit(k, getattr(self, k))

def _err(key: str, msg: str) -> ConfigError:
    return ConfigError(f"{key}: {msg}")


def _positive(key: str, v) -> None:
    if v <= 0:
        raise _err(key, f"must be > 0, got {v}")


def _non_negative(key: str, v) -> None:
    if v < 0:
        raise _err(key, f"must be >= 0, got {v}")


def _unit(key: str, v) -> None:
    if not 0 <= v <= 1:
        raise _err(key, f"must be in [0, 1], got {v}")


def _one_of(key: str, v, options) -> None:
    if v not in options:
        raise _err(key, f"'{v}' is not one of {', '.join(options)}")
