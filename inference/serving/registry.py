"""The models a server has loaded, their versions' states, and how a read picks one (the runners come from
:mod:`inference.serving.runners`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from inference.config import TritonConfig
from inference.engine.runner import ModelRunner
from inference.errors import BackendUnavailableError, InvalidInputError, ModalityMismatchError, ModelNotFoundError
from inference.modelrepo.repository import VersionSource, discover, sources_at, version_key
from inference.modelrepo.schema import MODALITIES, ModelConfig
from inference.serving.promotion_routing import PromotionRouting
from inference.serving.runners import build_runner

logger = logging.getLogger(__name__)

# Version states (ListModels): a version is READY while it serves reads, LOADING while its first load runs,
# FAILED when that load failed (never served), UNLOADING when it left routing and finishes its reads.
LOADING = "LOADING"
READY = "READY"
FAILED = "FAILED"
UNLOADING = "UNLOADING"
# Where a version came from: the repository scan (the watcher unloads it when its directory goes away),
# or a LoadModel request for a path (kept until unloaded).
FROM_REPOSITORY = "repository"
FROM_REQUEST = "request"
_MAX_REASON_CHARS = 2000
# Whether a READY version may take default routing (docs/decisions.md, "Shadow versions and promotion"): "auto"
# (model.yaml `promote: auto`), "promoted" (by `radserve models promote`, or as the only version of its model),
# "candidate" (`promote: manual`, not promoted: it serves only reads naming it), "demoted" (rolled back, or displaced
# by the promotion of an older version).
AUTO, PROMOTED, CANDIDATE, DEMOTED = "auto", "promoted", "candidate", "demoted"


@dataclass(frozen=True)
class VersionState:
    version: str
    state: str  # LOADING | READY | FAILED | UNLOADING
    reason: str = ""  # FAILED: why; READY: a reload under way or failed (the previous load keeps serving)
    source: str = ""  # the directory it was loaded from
    weights_sha256: str = ""  # of the weights serving (READY, UNLOADING)
    promotion: str = ""  # auto | promoted | candidate | demoted ("" when not READY)


@dataclass(frozen=True)
class ModelListing:
    name: str
    config: ModelConfig | None  # of the newest READY version; None when none is READY
    device: str
    versions: list[VersionState]
    default_version: str  # what a read naming this model without a version gets ("" when none is READY)


class _Serving:
    """A started runner in routing (or draining), with the reads holding it."""

    def __init__(self, runner: ModelRunner, weights_sha256: str) -> None:
        self.runner = runner
        self.weights_sha256 = weights_sha256
        self.leases = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def acquire(self) -> None:
        self.leases += 1
        self.idle.clear()

    def release(self) -> None:
        self.leases -= 1
        if self.leases == 0:
            self.idle.set()


class _Entry:
    """One model version: the load state machine around at most one serving runner."""

    def __init__(self, source: VersionSource, origin: str) -> None:
        self.source = source
        self.origin = origin
        self.serving: _Serving | None = None
        self.loading = True  # a new entry is created by the load that is about to run
        self.error = ""  # of the last load attempt that failed ("" after a success)
        self.signature: tuple | None = None  # of the files at the last load attempt
        self.digest: str | None = None  # of the files at the last load attempt
        self.promoted = False  # by `radserve models promote` (or as its model's only version)
        self.demoted = False  # by a rollback, or by the promotion of an older version

    @property
    def promotion(self) -> str:
        """auto | promoted | candidate | demoted; "" while no runner serves."""
        if self.serving is None:
            return ""
        if self.demoted:
            return DEMOTED
        if self.promoted:
            return PROMOTED
        return AUTO if self.serving.runner.config.promote == "auto" else CANDIDATE

    @property
    def in_default_routing(self) -> bool:
        return self.promotion in (AUTO, PROMOTED)

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def version(self) -> str:
        return self.source.version

    @property
    def state(self) -> str:
        if self.serving is not None:
            return READY
        return LOADING if self.loading else FAILED

    @property
    def reason(self) -> str:
        if self.serving is None:
            return "" if self.loading else self.error
        if self.loading:
            return "reloading: its files changed; the previous load serves meanwhile"
        if self.error:
            return f"reload failed, the previous load keeps serving: {self.error}"
        return ""


class ModelRegistry(PromotionRouting):
    """Model versions by name, their load states, and routing of reads.

    Loading (:meth:`load`) runs off the event loop, one load at a time; a version only enters routing once
    built, warmed up and started, so reads never wait for a load. A version that fails to load never
    replaces the one serving (a failed reload keeps the previous weights). A runner leaving routing
    (replaced or unloaded) is drained once the reads holding it (:meth:`lease`) are done, so every read
    finishes on the version it started with.
    """

    def __init__(
        self,
        device: torch.device,
        io_executor: Executor | None = None,
        *,
        default_models: Mapping[str, str] | None = None,
        warmup: bool = True,
        backend: str = "torch",
        triton: TritonConfig | None = None,
    ) -> None:
        self.device = device
        self.warmup = warmup
        self.backend = backend  # the server's --backend; model.yaml `backend:` overrides it per model
        self.triton = triton or TritonConfig()
        self.default_models = dict(default_models or {})  # modality -> model name
        self.repository: Path | None = None
        self._io_executor = io_executor
        self._entries: dict[str, dict[str, _Entry]] = {}  # name -> version -> entry
        self._retiring: list[tuple[str, str, _Serving]] = []
        self._tasks: set[asyncio.Task] = set()
        self._unloaded: set[str] = set()  # "name:version" unloaded by request: the watcher leaves them alone
        self._load_lock = asyncio.Lock()
        self._listeners: list[Callable[[], None]] = []
        # Applied to every new runner before it starts (server settings such as the OOM fallback).
        self.runner_setup: Callable[[ModelRunner], None] | None = None

    # -- loading ---------------------------------------------------------------------------------------

    def add_listener(self, callback: Callable[[], None]) -> None:
        """``callback()`` after every change of a version's state (health, metrics)."""
        self._listeners.append(callback)

    def _notify(self) -> None:
        for callback in self._listeners:
            try:
                callback()
            except Exception:  # a listener must not break loading
                logger.exception("registry listener failed")

    async def load_repository(self, root: Path, *, warmup: bool | None = None) -> None:
        """Load every version of the repository (what ``serve`` does at start-up)."""
        if warmup is not None:
            self.warmup = warmup
        self.repository = Path(root)
        sources = await asyncio.to_thread(discover, root)
        # Oldest first within a model: with `promote: manual` versions, the oldest takes default routing.
        for source in sorted(sources, key=lambda s: (s.name, version_key(s.version))):
            if source.key not in self._unloaded:
                await self.load(source, origin=FROM_REPOSITORY)

    async def load_path(self, path: Path) -> list[tuple[str, VersionState, str]]:
        """``radserve models load DIR``: (re)load the versions at ``path`` (see ``sources_at``) and return
        each as (name, state, error of this load or ""). Explicitly loading a version undoes an earlier unload."""
        try:
            sources = await asyncio.to_thread(sources_at, Path(path), self.repository)
        except FileNotFoundError as exc:
            raise ModelNotFoundError(str(exc)) from exc
        except (OSError, ValueError) as exc:
            raise InvalidInputError(str(exc)) from exc
        results = []
        for source in sources:
            self._unloaded.discard(source.key)
            inside = self.repository is not None and source.path.is_relative_to(Path(self.repository).resolve())
            entry = await self.load(source, origin=FROM_REPOSITORY if inside else FROM_REQUEST, retry_failed=True)
            results.append((source.name, self._state_of(entry), entry.error))
        return results

    def get_entry(self, name: str, version: str) -> _Entry | None:
        return self._entries.get(name, {}).get(version)

    async def load(
        self,
        source: VersionSource,
        *,
        origin: str = FROM_REPOSITORY,
        signature: tuple | None = None,
        retry_failed: bool = False,
    ) -> _Entry:
        """Load (or reload) one version. Returns its entry: READY, or FAILED with the reason.

        A version already READY from identical files is left alone (a touched file is no reload); so is a
        FAILED one unless ``retry_failed``. ``signature`` is the files' signature the caller saw.
        """
        async with self._load_lock:
            entry = self.get_entry(source.name, source.version)
            if entry is None:
                entry = _Entry(source, origin)
                self._entries.setdefault(source.name, {})[source.version] = entry
            elif entry.source.path != source.path and entry.origin == FROM_REQUEST and origin == FROM_REPOSITORY:
                return entry  # loaded by request from elsewhere: the request wins over the repository's copy
            entry.source, entry.origin = source, origin
            try:
                if signature is None:
                    signature = await asyncio.to_thread(source.signature)
                digest, weights_sha = await asyncio.to_thread(source.digest)
            except Exception as exc:  # unreadable files: the load below fails and says why
                digest, weights_sha = f"unreadable: {exc}", ""
            unchanged = digest == entry.digest
            entry.signature = signature
            if unchanged and ((entry.serving is not None and not entry.error) or (entry.error and not retry_failed)):
                return entry
            entry.digest = digest
            entry.loading = True
            self._notify()
            key = source.key
            try:
                logger.info("model %s: loading from %s", key, source.path)
                config = await asyncio.to_thread(source.load_config)
                runner = await asyncio.to_thread(
                    functools.partial(
                        build_runner, config, self.device, self._io_executor, backend=self.backend, triton=self.triton
                    )
                )
                runner.weights_sha256 = weights_sha  # the derived UIDs of its SR and SEG hash it
                if self.runner_setup is not None:
                    self.runner_setup(runner)
                if self.warmup:
                    try:
                        await asyncio.to_thread(runner.warmup)
                    except BackendUnavailableError as exc:
                        if not runner.backend.remote:
                            raise
                        # A remote backend that is down is no broken version: the version serves once it is
                        # back, and health says NOT_SERVING meanwhile (the server's backend watcher).
                        logger.warning("model %s: not warmed up, its backend is unavailable: %s", key, exc)
                await runner.start()
            except Exception as exc:  # a broken version must never take down the others
                entry.loading = False
                entry.error = f"{type(exc).__name__}: {exc}"[:_MAX_REASON_CHARS]
                if entry.serving is None:
                    # A traceback only for what is not a plain configuration or file problem.
                    expected = isinstance(exc, (ValueError, OSError, yaml.YAMLError))
                    logger.error("model %s failed to load: %s", key, entry.error, exc_info=None if expected else exc)
                else:
                    logger.error("model %s: reload failed, previous load keeps serving: %s", key, entry.error)
                self._notify()
                return entry
            finally:
                entry.loading = False  # also when cancelled (shutdown)
            new = _Serving(runner, weights_sha)
            if key in self._unloaded or self.get_entry(source.name, source.version) is not entry:
                self._retire(source.name, source.version, new)  # unloaded while it loaded
                return entry
            old, entry.serving, entry.error = entry.serving, new, ""
            if old is not None:
                self._retire(source.name, source.version, old)
            self._ensure_default(source.name)
            logger.info(
                "model %s %s (%s, %s, weights sha256 %s)",
                key,
                "reloaded" if old is not None else "ready",
                config.task,
                "/".join(config.modalities),
                weights_sha[:12],
            )
            self._notify()
            return entry

    # -- unloading -------------------------------------------------------------------------------------

    async def unload(self, name: str, version: str | None = None, *, sticky: bool = True) -> list[str]:
        """Take ``name`` (one version, or all) out of routing; their runners drain in the background.

        Returns the "name:version" keys removed. ``sticky``: the repository watcher does not load them
        again (until an explicit load). Raises ModelNotFoundError for an unknown name or version.
        """
        versions = self._entries.get(name)
        if not versions:
            raise ModelNotFoundError(f"model {name!r} is not loaded; loaded models: {sorted(self._entries)}")
        if version and version not in versions:
            raise ModelNotFoundError(f"model {name!r} has no version {version!r}; versions: {sorted(versions)}")
        removed = []
        for v in [version] if version else list(versions):
            entry = versions.pop(v)
            if sticky:
                self._unloaded.add(entry.source.key)
            if entry.serving is not None:
                self._retire(name, v, entry.serving)
                entry.serving = None
            removed.append(f"{name}:{v}")
        if not versions:
            del self._entries[name]
        else:
            self._ensure_default(name)
        logger.info("unloaded %s", ", ".join(removed))
        self._notify()
        return removed

    def is_unloaded(self, key: str) -> bool:
        return key in self._unloaded

    def _retire(self, name: str, version: str, serving: _Serving) -> None:
        item = (name, version, serving)
        self._retiring.append(item)
        task = asyncio.get_running_loop().create_task(self._drain(item))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, item: tuple[str, str, _Serving]) -> None:
        name, version, serving = item
        try:
            if serving.leases:
                logger.info("model %s:%s: draining %d read(s) in flight", name, version, serving.leases)
            await serving.idle.wait()
            await serving.runner.stop(drain=True)
            logger.info("model %s:%s: previous runner stopped", name, version)
        except Exception:
            logger.exception("model %s:%s: stopping the runner failed", name, version)
        finally:
            if item in self._retiring:
                self._retiring.remove(item)
            self._notify()

    # -- routing ---------------------------------------------------------------------------------------

    @property
    def runners(self) -> list[ModelRunner]:
        """The runners in routing (READY versions)."""
        return [e.serving.runner for v in self._entries.values() for e in v.values() if e.serving is not None]

    def backends_ready(self) -> bool:
        """Whether every READY version's backend can run now (a remote one, e.g. Triton, is asked; blocking:
        call it in a thread). A local backend (torch) always can."""
        ready = True
        for runner in self.runners:
            if not runner.backend.is_ready():
                ready = False  # ask every backend, so that each logs its own transitions
        return ready

    def entries(self) -> list[_Entry]:
        return [e for versions in self._entries.values() for e in versions.values()]

    def _newest_ready(self, name: str) -> _Entry | None:
        """The version a read naming ``name`` and no version gets: the newest READY one in default routing."""
        ready = [e for e in self._entries.get(name, {}).values() if e.in_default_routing]
        return max(ready, key=lambda e: version_key(e.version)) if ready else None

    def _route(self, name: str | None, version: str | None, modality: str) -> _Serving:
        if name:
            versions = self._entries.get(name)
            if not versions:
                raise ModelNotFoundError(f"model {name!r} is not loaded; loaded models: {self._ready_names()}")
            if version:
                entry = versions.get(version)
                if entry is None:
                    raise ModelNotFoundError(f"model {name!r} has no version {version!r}; versions: {sorted(versions)}")
            else:
                entry = self._newest_ready(name) or max(versions.values(), key=lambda e: version_key(e.version))
            if entry.serving is None:
                if entry.loading:
                    raise BackendUnavailableError(f"model {entry.source.key} is still loading; retry shortly")
                raise ModelNotFoundError(f"model {entry.source.key} failed to load: {entry.error}")
            if modality not in entry.serving.runner.config.modalities:
                raise ModalityMismatchError(
                    f"model {name!r} reads {'/'.join(entry.serving.runner.config.modalities)} studies, not {modality}"
                )
            return entry.serving
        preferred = self.default_models.get(modality)
        names = sorted(self._entries, key=lambda n: (n != preferred, n))
        for candidate in names:
            entry = self._newest_ready(candidate)
            if entry is not None and modality in entry.serving.runner.config.modalities:
                return entry.serving
        raise ModalityMismatchError(f"no loaded model reads {modality} studies; loaded models: {self._ready_names()}")

    def _ready_names(self) -> list[str]:
        return sorted(n for n in self._entries if self._newest_ready(n) is not None)

    def resolve(self, name: str | None, version: str | None, modality: str) -> ModelRunner:
        """The runner for a read: by name (newest READY version unless given), else by the study's modality
        (``default_models[modality]`` first, then the other models in name order). Prefer :meth:`lease`."""
        return self._route(name, version, modality).runner

    @contextlib.asynccontextmanager
    async def lease(self, name: str | None, version: str | None, modality: str) -> AsyncIterator[ModelRunner]:
        """Resolve as :meth:`resolve` and hold the runner for the read: it is not stopped until released."""
        serving = self._route(name, version, modality)
        serving.acquire()
        try:
            yield serving.runner
        finally:
            serving.release()

    def default_routes(self) -> dict[str, str]:
        """modality -> "name:version" a read naming no model gets now."""
        routes = {}
        for modality in MODALITIES:
            try:
                runner = self.resolve(None, None, modality)
            except ModalityMismatchError:
                continue
            routes[modality] = runner.key
        return routes

    # -- listing ---------------------------------------------------------------------------------------

    def _state_of(self, entry: _Entry) -> VersionState:
        return VersionState(
            entry.version,
            entry.state,
            entry.reason,
            str(entry.source.path),
            entry.serving.weights_sha256 if entry.serving is not None else "",
            entry.promotion,
        )

    def list_models(self) -> list[ModelListing]:
        names = sorted(set(self._entries) | {name for name, _, _ in self._retiring})
        rows = []
        for name in names:
            versions = self._entries.get(name, {})
            states = [self._state_of(versions[v]) for v in versions]
            for retiring_name, version, serving in self._retiring:
                if retiring_name == name:
                    reason = f"draining {serving.leases} read(s)" if serving.leases else "stopping"
                    states.append(
                        VersionState(
                            version,
                            UNLOADING,
                            reason,
                            str(serving.runner.config.directory or ""),
                            serving.weights_sha256,
                        )
                    )
            states.sort(key=lambda s: (version_key(s.version), s.state != READY))
            newest = self._newest_ready(name)
            rows.append(
                ModelListing(
                    name=name,
                    config=newest.serving.runner.config if newest is not None else None,
                    device=str(newest.serving.runner.device) if newest is not None else str(self.device),
                    versions=states,
                    default_version=newest.version if newest is not None else "",
                )
            )
        return rows

    async def close(self, *, drain: bool = True) -> None:
        for task in list(self._tasks):
            task.cancel()
        runners = [s.runner for _, _, s in self._retiring] + self.runners
        self._retiring.clear()
        self._entries.clear()
        for runner in runners:
            try:
                await runner.stop(drain=drain)
            except Exception:
                logger.exception("model %s: stopping failed", runner.key)
