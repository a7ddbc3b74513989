"""The streaming trainer's loop: joined samples in, validated bundle versions out.

Starts from the version CURRENT names (its checkpoints in <root>/checkpoints/<version>/) and,
for a streamed version, from the joined-samples offset recorded in its manifest. Trains every
commit once (SampleFeed keeps the freshest back for validation): the rankers
(model_export.stream.rankers) and the id-embedding rows (model_export.stream.embeddings), as
`stream.models` says. Every `publish_rows` samples or `publish_s` seconds it exports the
retrained rankers with the parity check, writes the refreshed tables, validates each model
against the serving one (model_export.stream.gate) and publishes a version with the models
that pass, every other file linked (model_export.stream.publish); a refused model rolls back
to the serving weights, its samples recorded as skipped. Killed at any point, it resumes from
the last published version: the samples after that version's offset are read again, none
before it. A journal (trainer.jsonl in the root) lists every version published and every
candidate refused.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.core.bundle import current_version, load_bundle, resolve
from engine.core.config import Config
from engine.core.featurize import ranker_user_dim
from model_export.bundle_writer import BundleWriter
from model_export.export import ParityError, export_checked, parity_cases
from model_export.joined import JoinedOffset
from model_export.models import load_checkpoints
from model_export.stream import publish
from model_export.stream.embeddings import WRITTEN as EMB_WRITTEN
from model_export.stream.embeddings import EmbeddingLearner
from model_export.stream.gate import validate
from model_export.stream.rankers import RANKERS, RankerLearner
from model_export.stream.samples import SampleFeed, Samples, concat, digest, to_samples
from model_export.stream.tables import SeqSource
from model_export.train import TRAIN_THREADS

LOCK = "trainer.lock"
JOURNAL = "trainer.jsonl"


class TrainerError(RuntimeError):
    """The trainer cannot start: one line saying why."""


@dataclass
class Interval:
    """What has been trained since the last published version."""
    after: Any                                       # JoinedOffset the interval starts after
    through: Any = None                              # offset of the last trained commit
    rows: int = 0
    digest: int = 0
    dropped: int = 0
    commits: list[int] = field(default_factory=list)
    loss: dict[str, float] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)   # refused intervals since the parent
    skip_from: Any = None                            # offset after the last refused interval


class StreamTrainer:
    def __init__(self, root: Path, joined: Path, cfg: Config, follow: bool = True, out=print):
        self.root, self.joined, self.cfg, self.sc, self.follow, self.out = root, joined.absolute(), cfg, cfg.stream, \
            follow, out
        self._lock = open(root / LOCK, "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise TrainerError(f"{root}: another trainer is running ({LOCK} is held)") from None
        torch.set_num_threads(TRAIN_THREADS)
        removed = publish.clean(root)
        if removed:
            self.out(f"train: removed what a killed trainer left: {', '.join(removed)}")
        self.published = 0
        self._start()
        self._reconcile()

    # -- state --------------------------------------------------------------------------
    def _start(self) -> None:
        """(Re)load everything from the version CURRENT names."""
        self.vdir = resolve(self.root)
        self.bundle = load_bundle(self.vdir)
        info = publish.stream_info(self.vdir) or {}
        if info and info.get("joined") != str(self.joined):
            raise TrainerError(f"{self.vdir.name} was trained from {info.get('joined')}, not {self.joined}: its "
                               "offsets mean nothing there (point --joined at that folder, or CURRENT at a build)")
        ckpt = self.root / publish.CHECKPOINTS / self.vdir.name
        if not (ckpt / "models.json").is_file():
            raise TrainerError(f"{ckpt}: no checkpoints for {self.vdir.name} (recserve build keeps the torch "
                               f"state_dicts in <root>/{publish.CHECKPOINTS}/<version>/)")
        self.seq = int(info.get("seq", 0))
        self.base = info.get("base", self.vdir.name)
        self.rows_total = int(info.get("rows_total", 0))
        after = JoinedOffset.from_json(info.get("through"))
        models = self.sc.models
        loaded = load_checkpoints(ckpt)          # once: both learners start from these modules
        self.rankers = (RankerLearner(ckpt, loaded, self.sc, self.bundle.tasks)
                        if set(models) & set(RANKERS) else None)
        self.embeddings = (EmbeddingLearner(ckpt, loaded, self.bundle, self.sc, self.cfg.train.tt_temperature)
                           if "id_embeddings" in models else None)
        self.seqsrc = SeqSource(self.root, self.bundle.tables)
        self.feed = SampleFeed(self.joined, after, self.sc.holdout_rows)
        self.interval = Interval(after)
        self.serving_snapshot = self._snapshot()
        self.last_publish = time.monotonic()
        schema = self.bundle.manifest["schema"]
        d = schema["embed_dim"]
        self.widths = (ranker_user_dim(d, schema["profile_cardinality"], schema["context_cardinality"]),
                       d + len(schema["coarse_features"]), schema["recent_len"])
        self.out(f"train: from {self.vdir.name} ({'streamed, seq ' + str(self.seq) if info else 'offline build'}), "
                 f"joined samples {self.joined} after {after.segment or 'the start'}@{after.pos}, "
                 f"training {', '.join(models)}")

    def _learners(self) -> list:
        return [x for x in (self.embeddings, self.rankers) if x is not None]

    def _snapshot(self) -> list:
        return [x.snapshot() for x in self._learners()]

    def _restore(self, snaps: list, names: set[str] | None = None) -> None:
        for x, snap in zip(self._learners(), snaps):
            x.restore(snap, names)

    def _samples(self, table) -> Samples:
        return to_samples(table, self.bundle.tasks, *self.widths)

    # -- loop ---------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> int:
        """Until `stop` (follow), or until the samples there are trained and published (once)."""
        chunk: list = []
        while not stop.is_set():
            if current_version(self.root) != self.vdir.name:
                self.out(f"train: CURRENT now names {current_version(self.root)}, not {self.vdir.name}: restarting "
                         "from it")
                self._start()
                chunk = []
            read = self.feed.poll(self.sc.buffer_rows)
            chunk += self.feed.trainable()
            if sum(t.num_rows for t, _ in chunk) >= self.sc.buffer_rows:
                self._train(chunk)
                chunk = []
            if self._due(chunk):
                self._train(chunk)
                chunk = []
                self._publish()
            elif not read:
                if not self.follow:
                    self._train(chunk)
                    if self.interval.rows >= max(self.sc.min_rows, 1) and self._holdout_ready():
                        self._publish()
                    return 0
                stop.wait(self.sc.poll_s)
        return 0

    def _due(self, chunk: list) -> bool:
        pending = self.interval.rows + sum(t.num_rows for t, _ in chunk)
        if pending < max(self.sc.min_rows, 1) or not self._holdout_ready():
            return False
        return pending >= self.sc.publish_rows or time.monotonic() - self.last_publish >= self.sc.publish_s

    def _holdout_ready(self) -> bool:
        h = self.feed.holdout()
        if h is None or h.num_rows < self.sc.holdout_rows:
            return False
        return int(np.asarray(h[f"label_{self.bundle.tasks[0]}"]).sum()) >= self.sc.min_holdout_positives

    def _train(self, chunk: list) -> None:
        if not chunk:
            return
        s = concat([self._samples(t) for t, _ in chunk])
        loss = {}
        for k, x in enumerate(self._learners()):
            rng = np.random.default_rng([self.cfg.train.seed, chunk[0][1].seq, k])
            loss.update(x.train(s, self.seqsrc, rng, self.embeddings) if x is self.rankers else x.train(s, rng))
        iv = self.interval
        for t, c in chunk:
            iv.digest = (iv.digest + digest(t)) % (1 << 64)
            iv.commits.append(c.seq)
            iv.through = c.offset
        iv.rows += sum(t.num_rows for t, _ in chunk)
        iv.dropped += s.dropped
        w = len(s) / max(iv.rows - iv.dropped, 1)
        iv.loss = {k: iv.loss.get(k, 0.0) * (1 - w) + v * w for k, v in loss.items()}

    # -- publish ------------------------------------------------------------------------
    def _candidate(self, writer: BundleWriter, holdout: Samples) -> tuple[dict, dict, dict[str, set[str]], dict]:
        """Write the candidate's new files; (held-out AUCs, manifest model entries, files written
        per model, refreshed-row counts). The rankers are scored on the inputs they would serve
        with: the refreshed embeddings spliced in when those pass, the logged ones otherwise."""
        aucs, models, written, rows = {}, {}, {}, {}
        task = self.bundle.tasks[0]
        cand, cand_seq = holdout, self.seqsrc
        if self.embeddings is not None:
            item_emb, rows = self.embeddings.write(writer, self.vdir, self.bundle)
            written["two_tower"] = set(EMB_WRITTEN)
            aucs.update(self.embeddings.evaluate(holdout, item_emb, self.bundle.tables, task))
            if validate(aucs, task, self.sc.auc_margin).passed:
                cand = self.embeddings.as_served(holdout, item_emb)
                cand_seq = SeqSource.fixed(dataclasses.replace(self.bundle.tables, item_emb=item_emb))
        if self.rankers is not None:
            paths = {}
            for name, model in self.rankers.models.items():
                rel = f"models/{name}.onnx"
                parity = export_checked(name, model, writer.path(rel),
                                        parity_cases(name, cand.rows, self.bundle.tables),
                                        self.cfg.train.parity_tol)
                paths[name] = writer.path(rel)
                models[name] = {**self.bundle.manifest["models"][name], "parity_max_abs_diff": parity}
                written[name] = {rel}
            aucs.update(self.rankers.evaluate((paths, cand, cand_seq),
                                              ({n: self.vdir / f"models/{n}.onnx" for n in paths}, holdout, self.seqsrc)))
        return aucs, models, written, rows

    def _publish(self) -> None:
        iv, t0 = self.interval, time.monotonic()
        self.last_publish = t0
        holdout = self._samples(self.feed.holdout())
        writer = BundleWriter(self.root, prefix=publish.TMP_PREFIX)
        try:
            aucs, models, written, refreshed = self._candidate(writer, holdout)
            verdict = validate(aucs, self.bundle.tasks[0], self.sc.auc_margin, len(holdout),
                               int(holdout.rows.labels[:, 0].sum()))
        except ParityError as e:
            writer.abort()
            self._refuse(str(e), {})
            return
        except BaseException:
            writer.abort()
            raise
        if not verdict.passed:
            writer.abort()
            self._refuse(verdict.reason, verdict.auc)
            return
        for name in verdict.failed:                  # refused models: the serving version's files stay
            for rel in written.pop(name):
                writer.path(rel).unlink()
            models.pop(name, None)
        self._restore(self.serving_snapshot, set(verdict.failed))
        skipped = iv.skipped + ([{**self._range(iv), "kind": "models_refused", "models": sorted(verdict.failed),
                                  "reason": verdict.reason}] if verdict.failed else [])
        seq = self.seq + 1
        version = publish.version_name(seq)
        info = {"seq": seq, "parent": self.vdir.name, "base": self.base, "joined": str(self.joined),
                "after": iv.after.to_json(), "through": iv.through.to_json(), "rows": iv.rows,
                "rows_total": self.rows_total + iv.rows, "digest": f"{iv.digest:016x}", "dropped": iv.dropped,
                "commits": [iv.commits[0], iv.commits[-1]], "skipped": skipped, "trained": sorted(verdict.passed),
                "refreshed_rows": refreshed if "two_tower" in verdict.passed else {}, "loss": iv.loss,
                "holdout": {"rows": verdict.rows, "positives": verdict.positives, "auc": verdict.auc},
                "published_unix": time.time(), "publish_seconds": round(time.monotonic() - t0, 2)}
        try:
            vdir = publish.commit_version(writer, self.vdir, version, set().union(*written.values()),
                                          {"stream": info, "models": models}, self._save_checkpoints)
        except BaseException:
            writer.abort()
            raise
        self.seq, self.rows_total, self.published = seq, self.rows_total + iv.rows, self.published + 1
        self.vdir = vdir
        self.bundle = load_bundle(vdir, verify=False)
        self.seqsrc.set_current(self.bundle.tables)
        if self.embeddings is not None and "two_tower" in verdict.passed:
            self.embeddings.published()
        self.serving_snapshot = self._snapshot()
        self.interval = Interval(iv.through)
        gone = publish.prune(self.root, self.sc.keep_versions)
        self.seqsrc.forget({p.name for p in self.root.iterdir()})
        task = self.bundle.tasks[0]
        aucs = " ".join(f"{n} {a['candidate'][task]:.4f} (serving {a['serving'][task]:.4f})"
                        + (" refused" if n in verdict.failed else "") for n, a in verdict.auc.items())
        self.out(f"train: published {version}: {iv.rows} samples (commits {iv.commits[0]}-{iv.commits[-1]}, "
                 f"{self.rows_total} in all), holdout auc_{task} {aucs}"
                 + (f", refreshed {refreshed['users']} user and {refreshed['items']} item rows"
                    if info["refreshed_rows"] else "")
                 + f", {info['publish_seconds']:.1f} s" + (f"; pruned {len(gone)}" if gone else ""))
        self._journal({"event": "published", "version": version, **info})

    @staticmethod
    def _range(iv: Interval) -> dict[str, Any]:
        return {"after": (iv.skip_from or iv.after).to_json(), "through": iv.through.to_json(), "rows": iv.rows,
                "digest": f"{iv.digest:016x}"}

    def _save_checkpoints(self, out: Path) -> None:
        """The learners' files, then the parent's others linked (the models nobody trains)."""
        out.mkdir(parents=True)
        for x in self._learners():
            x.save(out)
        parent = self.root / publish.CHECKPOINTS / self.vdir.name
        for f in parent.iterdir():
            if f.is_file() and not (out / f.name).exists():
                os.link(f, out / f.name)

    def _refuse(self, reason: str, aucs: dict) -> None:
        """No model passed: logged, every learner back to the serving version's weights, the
        interval skipped (listed in the next version's `stream.skipped`; it still starts after
        the parent)."""
        iv = self.interval
        skipped = {**self._range(iv), "kind": "refused", "models": sorted(self.sc.models), "reason": reason,
                   "time": time.time()}
        self._restore(self.serving_snapshot)
        self.interval = Interval(iv.after, through=iv.through, skip_from=iv.through, skipped=[*iv.skipped, skipped])
        self.out(f"train: refused a candidate after {iv.rows} samples (serving {self.vdir.name} stays): {reason}")
        self._journal({"event": "refused", "parent": self.vdir.name, **skipped, "auc": aucs})

    def _journal(self, entry: dict[str, Any]) -> None:
        """One line per published or refused candidate, appended with one write."""
        line = (json.dumps(entry, default=float) + "\n").encode()
        fd = os.open(self.root / JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def _reconcile(self) -> None:
        """A trainer killed after flipping CURRENT but before its journal line: add the line."""
        info = publish.stream_info(self.vdir)
        if not info:
            return
        p = self.root / JOURNAL
        known = {json.loads(x).get("version") for x in p.read_text().splitlines() if x.strip()} if p.exists() else set()
        if self.vdir.name not in known:
            self._journal({"event": "published", "version": self.vdir.name, **info, "recovered": True})

    def close(self) -> None:
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()
