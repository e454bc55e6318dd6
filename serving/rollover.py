"""When and how the index replica moves to a new model version (see ``serving/index.py``).

A thread polls the model URI every ``reload_interval_s``.  When it names a model other than the
one served (a model is its name and version: registry versions restart at 1 for every name, so every
pair, report and index folder is keyed by both, :class:`ModelKey`), it prepares that model's pair
(build the index from the collection unless a folder of it exists holding every descriptor of the
service's ``features``, load it and the model, catch it up with the changes made meanwhile), switches to it under
the write lock, and keeps the old pair loaded for as long as a model replica still answers with the
old version (loading a large model from a remote registry can take minutes; a request it answers
meanwhile is searched in that version's index).  Once none has for ``OLD_GRACE_S``, the old pair is
unloaded and index folders beyond the last ``keep_indexes`` are removed.  A failure leaves the served
pair as it was and is retried with a growing delay; its reason is in the status (``/v1/status``,
``/readyz``).
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from deepindex.atomic import write_file

if TYPE_CHECKING:
    from serving.index import IndexServer, Pair

log = logging.getLogger(__name__)

STATE_FILE = "serving.json"
OLD_GRACE_S = 5.0  # an old pair stays loaded this long after the last model replica answered with it
SETTLE_POLL_S = 0.2  # how often a switch checks whether the model replicas have moved


class ModelKey(NamedTuple):
    """What the service keys a served model by: its name and version.  Registry versions restart at 1 for
    every name, so a version alone names no model (found on review: keyed by version, photos version 1
    replaced deepindex version 1 at once, model replicas still on deepindex were searched in photos' index,
    the ingress kept deepindex's concepts, and deepindex's index folder was never removed)."""

    name: str | None  # None only in a report of a caller that named no model (see IndexServer.report_model)
    version: str

    def __str__(self) -> str:
        return f"{self.name} version {self.version}"


# Changes of the collection made outside the service, applied to the served indexes at most this many at a
# time under the write lock (Rollover._follow_collection).
FOLLOW_BATCH = 256


class Rollover:
    def __init__(self, server: IndexServer, clock: Callable[[], float] = time.monotonic):
        from deepindex.index.build import collection_dir

        self.server = server
        a = server.args
        self.dir = collection_dir(a.collection, a.index_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.phase = "starting"
        self.target: dict[str, Any] | None = None  # the version being prepared
        self.progress: float | None = None
        self.message = ""
        self.last_error: str | None = None
        self.attempt = 0
        self.since = time.time()
        self.last_switch: dict[str, Any] | None = None
        self._clock = clock
        self._last_used: dict[ModelKey, float] = {}  # an old pair's model -> when a model replica last used it
        self._settling = False  # old pairs still loaded after a switch
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._poke = threading.Event()

    # ---- what others ask ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rollover", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def check_now(self) -> None:
        self._poke.set()

    def _served(self) -> Pair | None:
        s = self.server
        return s.pairs.get(s.serving) if s.serving is not None else None

    def model_target(self) -> dict[str, Any]:
        """The model model replicas serve: the served pair's, else (first start) the one being prepared."""
        p = self._served()
        if p is not None:
            return {"name": p.name, "version": p.version, "ref": p.ref}
        return dict(self.target) if self.target else {}

    def status(self) -> dict[str, Any]:
        """``serving`` and ``target`` are versions (as they always were); ``serving_name`` and ``target_name``
        the models they are of."""
        p = self._served()
        target = self.target or {}
        return {"phase": self.phase, "serving": p.version if p else None, "serving_name": p.name if p else None,
                "target": target.get("version"), "target_name": target.get("name"),
                "progress": self.progress, "message": self.message, "since": self.since,
                "attempt": self.attempt, "last_error": self.last_error, "last_switch": self.last_switch}

    def problem(self) -> str | None:
        if self.phase in ("idle", "starting") and not self.last_error:
            return None
        pct = f" {100 * self.progress:.0f}%" if self.progress is not None else ""
        return f"rollover {self.phase}{pct}: {self.message}" + (f" (last error: {self.last_error})"
                                                              if self.last_error else "")

    # ---- the loop -----------------------------------------------------------------------------------
    def _set(self, phase: str, message: str = "", progress: float | None = None) -> None:
        if phase != self.phase:
            self.since = time.time()
        if (phase, message) != (self.phase, self.message):
            log.info("rollover: %s %s", phase, message)
        self.phase, self.message, self.progress = phase, message, progress

    def _run(self) -> None:
        interval = max(0.5, self.server.args.reload_interval_s or 0.5)
        while not self._stop.is_set():
            try:
                self._step()
                self.last_error, self.attempt = None, 0
                # reload_interval_s=0: the model URI is never looked at again ("0 = never"; it was looked
                # at hourly), but for a switch to settle or an explicit check_now.
                wait = interval if self.server.args.reload_interval_s else math.inf
            except Exception as e:  # noqa: BLE001 - keep serving the pair we have; say why; try again later
                self.attempt += 1
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("rollover to %s failed (attempt %d): %s", (self.target or {}).get("version"),
                            self.attempt, self.last_error)
                self._set("retrying", f"version {(self.target or {}).get('version')}")
                wait = min(60.0, 2.0 ** self.attempt)
            deadline = time.monotonic() + wait
            # Until the next look at the model URI, check often whether the model replicas have moved.
            while self._settling and time.monotonic() < deadline and not self._poke.wait(SETTLE_POLL_S):
                if not self._settle() and self.phase == "switching":
                    self._set("idle", self._serving_message())
            self._poke.wait(None if math.isinf(deadline) else max(0.0, deadline - time.monotonic()))
            self._poke.clear()

    def _serving_message(self) -> str:
        p = self._served()
        return f"serving version {p.version}" if p is not None else "serving nothing"

    def restore(self) -> None:
        """A restarted replica serves what it served (``serving.json``), if that index is still there and
        holds every descriptor of the service's ``features`` (else the loop builds it again)."""
        f = self.dir / STATE_FILE
        try:
            st = json.loads(f.read_text()) if f.is_file() else None
        except (OSError, ValueError):
            st = None
        if not st:
            return
        try:
            self._activate(self._prepare(st, build=False), reason="restored")
        except Exception as e:  # noqa: BLE001 - no saved pair to serve: the loop picks a version
            log.warning("rollover: the saved pair %s could not be restored (%s)", st, e)

    def _follow_collection(self) -> None:
        """Apply the collection's changes made outside this service (``deepindex collection add | rm |
        import``, the k8s import Job) to the served indexes: only this service's own HTTP writes did, so a
        deleted item stayed in search results and an imported one never came, until the next HTTP write
        (found on review).  Under the write lock, as those writes; a failure is said, and retried next time."""
        s = self.server
        served = self._served()
        if served is None or s.store.head() <= served.index.seq:
            return
        try:
            while True:  # a batch at a time: an import of thousands holds the service's own writes no longer
                with s._write:
                    head, seq = s.store.head(), served.index.seq
                    if head <= seq:
                        break
                    s._sync_all(min(head, seq + FOLLOW_BATCH))
            log.info("rollover: applied the collection's changes up to %d made outside the service", head)
        except Exception as e:  # noqa: BLE001 - the served index stays as it was; the next step tries again
            log.warning("rollover: the collection's changes made outside the service not applied yet: %s: %s",
                        type(e).__name__, e)

    def _step(self) -> None:
        from deepindex.tracking.registry import LOCAL, resolve_model

        self._follow_collection()  # first: a registry that does not answer must not hold it up
        a = self.server.args
        r = resolve_model(a.model, a.tracking_uri)
        ref = f"models:/{r.name}/{r.version}" if r.name != LOCAL else a.model
        s = self.server
        # Registry versions restart at 1 for every model name: the same version of another name (the
        # service started again with --model models:/photos@champion on a collection that served
        # deepindex's) is another model, whose index is built and switched to (it used to stay idle,
        # tagging with one model and searching another's index).
        served = self._served()
        if served is not None and (served.name, served.version) == (r.name, r.version):
            self.target = None
            if not self._settle():
                self._set("idle", f"serving version {r.version}")
            return
        self.target = {"name": r.name, "version": r.version, "ref": ref}
        start = time.monotonic()
        pair = self._prepare(self.target, build=True)
        old, old_key = served, s.serving
        self._activate(pair, reason=f"from {old.name} version {old.version}" if old else "first start")
        # from and to: versions, as they always were; from_name and to_name: the models they are of.
        self.last_switch = {"from": old.version if old else None, "to": r.version,
                            "from_name": old.name if old else None, "to_name": r.name,
                            "seconds": round(time.monotonic() - start, 2), "items": len(pair.index), "at": time.time()}
        self.target = None
        if old_key is not None and old_key != ModelKey(pair.name, pair.version):
            self._last_used[old_key] = self._clock()
        if not self._settle():
            self._gc()
            self._set("idle", f"serving version {r.version}")

    def _settle(self) -> bool:
        """Unload each pair the service no longer serves once no model replica has answered with its
        model (name and version) for ``OLD_GRACE_S``, however long that takes (a model replica still
        loading the new version answers with the old one, and its similar-by-upload requests need the
        old index); then remove the index folders beyond ``keep_indexes``.  True while some old pair stays."""
        s = self.server
        old = [k for k in list(s.pairs) if k != s.serving]
        if not old:
            self._settling = False
            return False
        now = self._clock()
        using = s.model_versions()  # model replica -> the model (name, version) it answers with
        for k in old:
            if k in using.values():
                self._last_used[k] = now
            elif now - self._last_used.setdefault(k, now) >= OLD_GRACE_S:
                gone = s.pairs.pop(k, None)
                self._last_used.pop(k, None)
                if gone is not None:
                    log.info("rollover: unloaded %s version %s (no model replica answers with it)", gone.name,
                             gone.version)
        self._settling = any(k != s.serving for k in list(s.pairs))
        if not self._settling:
            self._gc()
            return False
        behind = sum(k != s.serving for k in using.values())
        served = self._served()
        self._set("switching", f"model replicas moving to version {served.version if served else None}"
                  + (f"; {behind} of {len(using)} still on an older one" if behind else ""))
        return True

    def _lacks(self, path: Any) -> list[str]:
        """The descriptors of the service's ``features`` that the index in ``path`` does not hold: such an
        index counts as none, and is built again (found on review: a folder of the version was loaded
        whatever it held, so adding last_but_two to ``features``, as the 422 ``bad_feature`` and
        ``serving/config.yaml`` say to, never took effect for a version that had an index)."""
        from deepindex.index.build import DEFAULT_FEATURES
        from deepindex.index.store import PROBS, read_manifest

        held = read_manifest(path).features
        wanted = dict.fromkeys(self.server.args.features or DEFAULT_FEATURES)  # names as the args read them
        return [f for f in wanted if f != PROBS and f not in held]

    def _prepare(self, target: dict[str, Any], build: bool) -> Pair:
        from deepindex.checkpoint import load_model
        from deepindex.index.build import build_index
        from deepindex.index.catchup import catch_up
        from deepindex.index.store import IndexStore, find_index
        from deepindex.tracking.registry import resolve_model
        from serving.index import Pair

        s = self.server
        a = s.args
        version = target["version"]
        # The ref must still hold this version: a checkpoint path whose file was replaced in place
        # holds another, and its weights beside this version's index would embed every new item
        # (and every uploaded example) in another space than the index's (found on review: a
        # restarted index replica restored the old index with the new file's weights).
        resolved = resolve_model(target["ref"], a.tracking_uri)
        if (resolved.name, resolved.version) != (target["name"], version):
            raise ValueError(f"{target['ref']} now holds version {resolved.version} of {resolved.name}, not "
                             f"{version} (replaced in place)")
        path = find_index(self.dir, target["name"], version, collection=a.collection)
        lacking = self._lacks(path) if path is not None else []
        if lacking:
            log.info("rollover: the index %s lacks %s of the service's features: %s", path, ", ".join(lacking),
                     "built again" if build else "not restored")
            path = None
        if path is None:
            if not build:
                raise FileNotFoundError(f"no index of {target['name']} version {version} in {self.dir}" + (
                    f" holding {', '.join(lacking)} (the service's features)" if lacking else ""))
            self._set("building", f"index of {a.collection} for version {version}", 0.0)
            res = build_index(target["ref"], collection=a.collection, index_dir=self.dir, tracking_uri=a.tracking_uri,
                              catalogue_url=a.catalogue_url, blobs_url=a.blobs_url, features=a.features,
                              workers=a.build_workers,
                              progress=lambda done, n: self._set(
                                  "building", f"embedded {done} of {n} items" if done
                                  else f"{n} items to embed; starting the embedding workers", done / max(n, 1)))
            path = res.path
        self._set("loading", f"index and model of version {version}")
        index = IndexStore.load(path)
        index.manifest.check_model(target["name"], version)
        lm = load_model(resolved.checkpoint_path)
        pair = Pair(target["name"], version, target["ref"], index, lm)
        behind = s.store.head() - index.seq
        self._set("catching_up", f"{behind} changes since the index's snapshot", 0.0)
        catch_up(index, s.store, pair.embed,
                 progress=lambda done, n: self._set("catching_up", f"applied {done} of {n} changes", done / max(n, 1)))
        return pair

    def _activate(self, pair: Pair, reason: str) -> None:
        """Make ``pair`` the served one: the last changes applied under the write lock, so none slips by."""
        from deepindex.index.catchup import catch_up

        s = self.server
        with s._write:
            catch_up(pair.index, s.store, pair.embed)
            key = ModelKey(pair.name, pair.version)
            s.pairs[key] = pair
            s.serving = key
            write_file(self.dir / STATE_FILE, json.dumps({"name": pair.name, "version": pair.version,
                                                          "ref": pair.ref}))
        log.info("rollover: serving %s version %s (%s), index of %d items at change %d", pair.name, pair.version,
                 reason, len(pair.index), pair.index.seq)

    def _gc(self) -> None:
        """Keep the newest ``keep_indexes`` index folders of the collection (never the served one's: by
        name and version, another model's folder of the same version is an old one)."""
        from deepindex.index.store import list_indexes

        keep = self.server.args.keep_indexes
        indexes = list_indexes(self.dir)
        served = self._served()
        mine = (served.name, served.version) if served is not None else None
        old = [p for p, m in indexes if (m.model.name, m.model.version) != mine]
        for path in old[: max(0, len(indexes) - keep)]:
            log.info("rollover: removing the old index %s (keeping the last %d)", path, keep)
            shutil.rmtree(path, ignore_errors=True)
