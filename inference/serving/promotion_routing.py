"""Which READY version of a model reads requests naming no version (a mixin of ModelRegistry): the first version,
promotion and rollback over the versions' flags (``_Entry.promoted``/``demoted``; docs/decisions.md, "Shadow versions
and promotion"). The guard that decides whether a promotion may happen is inference.serving.promotion's."""

from __future__ import annotations

import logging
from typing import Any

from inference.errors import ModelNotFoundError, PromotionRefusedError
from inference.modelrepo.repository import version_key

logger = logging.getLogger(__name__)


class PromotionRouting:
    """Uses ModelRegistry's ``_entries`` (name -> version -> entry), ``_newest_ready``, ``_ready_names`` and
    ``_notify``."""

    _entries: dict[str, dict[str, Any]]

    def _ensure_default(self, name: str) -> None:
        """A model with READY versions but none in default routing promotes its newest: its first version (whatever
        its ``promote``), or what is left after the default version was unloaded, so that no model becomes
        unreachable by name."""
        ready = [e for e in self._entries.get(name, {}).values() if e.serving is not None]
        if ready and not any(e.in_default_routing for e in ready):
            entry = max(ready, key=lambda e: version_key(e.version))
            entry.promoted, entry.demoted = True, False
            logger.info("model %s: takes default routing (no other version of %s has it)", entry.source.key, name)

    def default_version(self, name: str) -> str | None:
        """The version of ``name`` in default routing now (None when none is READY)."""
        entry = self._newest_ready(name)
        return entry.version if entry is not None else None

    def promote(self, name: str, version: str) -> str | None:
        """Make ``name:version`` (READY) the version reads naming no version get; newer versions in default routing
        are demoted. Returns the version that had default routing before (None when none). The guard is the
        caller's (inference.serving.promotion); reads in flight finish on the version they started with."""
        entry = self._ready_entry(name, version)
        previous = self.default_version(name)
        for other in self._entries[name].values():
            if other is not entry and other.in_default_routing and version_key(other.version) > version_key(version):
                other.demoted = True
        entry.promoted, entry.demoted = True, False
        logger.info("model %s:%s promoted (default routing; it was %s:%s)", name, version, name, previous)
        self._notify()
        return previous

    def rollback(self, name: str) -> tuple[str, str]:
        """Take the version in default routing out of it (it stays loaded, for reads naming it); the newest other
        version in default routing (the one serving before the last promotion or new version) takes over. Returns
        (version rolled back, version now serving). Reads in flight finish on the version they started with.
        FAILED_PRECONDITION when no other version is in default routing (a candidate never promoted is no
        fallback)."""
        current = self._newest_ready(name)
        if current is None:
            raise ModelNotFoundError(f"model {name!r} has no READY version; loaded models: {self._ready_names()}")
        others = [e for e in self._entries[name].values() if e is not current and e.in_default_routing]
        if not others:
            raise PromotionRefusedError(
                f"model {name!r} has no other version in default routing to roll back to from {current.version!r}; "
                "promote one (`radserve models promote NAME:VERSION`) or load the previous version"
            )
        current.promoted, current.demoted = False, True
        now = self.default_version(name) or ""
        logger.info("model %s rolled back from %s to %s", name, current.version, now)
        self._notify()
        return current.version, now

    def check_ready(self, name: str, version: str) -> None:
        """NOT_FOUND unless ``name:version`` is READY."""
        self._ready_entry(name, version)

    def _ready_entry(self, name: str, version: str) -> Any:
        versions = self._entries.get(name)
        if not versions:
            raise ModelNotFoundError(f"model {name!r} is not loaded; loaded models: {self._ready_names()}")
        entry = versions.get(version)
        if entry is None:
            raise ModelNotFoundError(f"model {name!r} has no version {version!r}; versions: {sorted(versions)}")
        if entry.serving is None:
            raise ModelNotFoundError(f"model {name}:{version} is not READY ({entry.state}): {entry.reason}")
        return entry
