"""Polling the model repository: new versions load, changed files reload, removed versions unload.

Every ``interval_s`` the watcher lists the repository (:func:`~inference.modelrepo.repository.discover`) and
compares each version's file signature (size and mtime of model.yaml / the bundle's configs and the weights)
with the one its last load saw:

* a version not loaded yet is loaded (unless an operator unloaded it: ``radserve models unload`` is sticky
  until ``radserve models load``);
* a version whose files changed is reloaded; the registry compares content hashes, so a touched file is no
  reload. A READY version keeps serving while it reloads, and keeps serving when the reload fails;
* a FAILED version is retried only when its files change;
* a version whose directory left the repository is unloaded (drained);
* versions loaded by ``radserve models load`` from outside the repository are watched for changes too.

Files modified less than ``settle_s`` ago are left for the next poll, so a weights file being copied is not
loaded half-written (copying to a temporary name and renaming is atomic and best). Listing, hashing and
loading all run off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from inference.modelrepo.repository import VersionSource, discover
from inference.serving.registry import FROM_REPOSITORY, FROM_REQUEST, ModelRegistry

logger = logging.getLogger(__name__)

__all__ = ["RepositoryWatcher"]


def _settling(signature: tuple, settle_s: float, now_s: float) -> bool:
    return any(mtime is not None and now_s - mtime / 1e9 < settle_s for _, _, mtime in signature)


def _snapshot(root: Path) -> dict[str, tuple[VersionSource, tuple]]:
    return {s.key: (s, s.signature()) for s in discover(root)}


class RepositoryWatcher:
    def __init__(self, registry: ModelRegistry, root: Path, interval_s: float, *, settle_s: float = 1.0) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.registry = registry
        self.root = Path(root).resolve()
        self.interval_s = float(interval_s)
        self.settle_s = float(settle_s)
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="radserve-model-watcher")
            logger.info("watching %s for model changes every %.1f s", self.root, self.interval_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a poll that fails (e.g. the repository is briefly unreadable) is retried
                logger.exception("polling the model repository %s failed", self.root)

    async def poll_once(self) -> None:
        """One pass: load new versions, reload changed ones, unload removed ones."""
        async with self._lock:
            try:
                snapshot = await asyncio.to_thread(_snapshot, self.root)
            except (OSError, ValueError) as exc:
                logger.warning("model repository %s cannot be listed: %s", self.root, exc)
                return
            now_s = time.time()
            for key, (source, signature) in snapshot.items():
                if self.registry.is_unloaded(key):
                    continue
                entry = self.registry.get_entry(source.name, source.version)
                if entry is not None and entry.signature == signature and entry.source.path == source.path:
                    continue
                if entry is not None and entry.origin == FROM_REQUEST and entry.source.path != source.path:
                    continue  # loaded by request from elsewhere: that copy is the one watched
                if _settling(signature, self.settle_s, now_s):
                    logger.debug("model %s: files still changing; next poll", key)
                    continue
                await self.registry.load(source, origin=FROM_REPOSITORY, signature=signature)
            for entry in self.registry.entries():
                if entry.loading:
                    continue
                if entry.origin == FROM_REPOSITORY and entry.source.key not in snapshot:
                    logger.info("model %s: its directory left the repository; unloading", entry.source.key)
                    await self.registry.unload(entry.name, entry.version, sticky=False)
                elif entry.origin == FROM_REQUEST:
                    signature = await asyncio.to_thread(entry.source.signature)
                    if signature != entry.signature and not _settling(signature, self.settle_s, time.time()):
                        await self.registry.load(entry.source, origin=FROM_REQUEST, signature=signature)
