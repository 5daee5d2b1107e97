"""Shadow versions: a fraction of a model's live reads also run on another loaded version of it, below all live work.

``radserve models shadow NAME:VERSION --fraction F`` marks a READY version of NAME, not the one in default routing,
as its shadow (one per model; marking another replaces it, ``--fraction 0`` ends it). Of the reads served by NAME's
default version, a fraction F (deterministically: every read adds F to an accumulator and is shadowed when it reaches
1) is read again by the shadow version once the live answer is out. Its findings are never returned; they are
compared with the live answer of the same read (:func:`match_findings`: same label, centers within the live
finding's radius, at least ``match_floor_mm``), and the totals (:class:`Agreement`) go to ListModels,
``radserve models list --format json`` and Prometheus.

Below all live work:

* a live read never waits for its shadow: the shadow read is queued after the live answer is built;
* the shadow read's preprocessing and postprocessing run in one thread of their own at the lowest CPU priority
  (nice 19), never in the I/O threads of live reads;
* its work items go to the shadow version's batcher at ``Priority.SHADOW`` (after STAT and ROUTINE reads naming that
  version), one batch at a time, each only when no live read is being computed (:meth:`ShadowManager.live_work`);
* a shadow read is skipped (counted, never queued) when ``max_pending`` are already waiting or the memory budget
  cannot hold its study: shadow reads never make a live read wait for memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from inference.errors import InvalidInputError, ModelNotFoundError, RadserveError
from inference.io.volume import Volume

logger = logging.getLogger(__name__)

MATCH_FLOOR_MM = 3.0  # a shadow finding matches a live one within the live finding's radius, at least this


@dataclass
class Agreement:
    """Running totals of one shadow version's comparisons with the live answers."""

    reads_compared: int = 0
    reads_skipped: int = 0  # sampled, not run: queue full, no memory free, version not READY
    reads_failed: int = 0  # the shadow read failed (the live read did not)
    live_findings: int = 0
    shadow_findings: int = 0
    matched: int = 0
    center_shift_mm_sum: float = 0.0  # over the matched pairs

    @property
    def live_found_share(self) -> float:
        """The share of live findings the shadow also found (1.0 when live found nothing)."""
        return self.matched / self.live_findings if self.live_findings else 1.0

    @property
    def shadow_found_share(self) -> float:
        """The share of shadow findings the live answer also has (1.0 when the shadow found nothing)."""
        return self.matched / self.shadow_findings if self.shadow_findings else 1.0

    @property
    def agreement(self) -> float:
        """The lower of the two shares: what the promotion guard holds against its floor."""
        return min(self.live_found_share, self.shadow_found_share)

    @property
    def mean_center_shift_mm(self) -> float:
        return self.center_shift_mm_sum / self.matched if self.matched else 0.0

    def add(self, live: Sequence[Any], shadow: Sequence[Any], floor_mm: float = MATCH_FLOOR_MM) -> None:
        pairs = match_findings(live, shadow, floor_mm)
        self.reads_compared += 1
        self.live_findings += len(live)
        self.shadow_findings += len(shadow)
        self.matched += len(pairs)
        self.center_shift_mm_sum += sum(distance for _, _, distance in pairs)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "reads_compared": self.reads_compared,
            "reads_skipped": self.reads_skipped,
            "reads_failed": self.reads_failed,
            "live_findings": self.live_findings,
            "shadow_findings": self.shadow_findings,
            "matched": self.matched,
            "live_found_share": self.live_found_share,
            "shadow_found_share": self.shadow_found_share,
            "mean_center_shift_mm": self.mean_center_shift_mm,
        }


def match_findings(live: Sequence[Any], shadow: Sequence[Any], floor_mm: float = MATCH_FLOOR_MM) -> list:
    """One-to-one pairs (live index, shadow index, center distance in mm) of findings with the same label whose
    centers lie within the live finding's radius (``diameter_mm / 2``, at least ``floor_mm``), nearest pairs first.
    Findings are anything with ``label``, ``center_mm`` and ``diameter_mm``."""
    candidates = []
    for i, a in enumerate(live):
        radius = max(floor_mm, a.diameter_mm / 2)
        for j, b in enumerate(shadow):
            if a.label != b.label or len(a.center_mm) != len(b.center_mm):
                continue
            distance = math.dist(a.center_mm, b.center_mm)
            if distance <= radius:
                candidates.append((distance, i, j))
    pairs, used_live, used_shadow = [], set(), set()
    for distance, i, j in sorted(candidates):
        if i not in used_live and j not in used_shadow:
            used_live.add(i)
            used_shadow.add(j)
            pairs.append((i, j, distance))
    return pairs


@dataclass
class ShadowTarget:
    """The shadow version of one model, its sampling fraction and its agreement so far."""

    name: str
    version: str
    fraction: float
    agreement: Agreement = field(default_factory=Agreement)
    _credit: float = 0.0

    def take(self) -> bool:
        """Whether the next live read is shadowed: every read adds ``fraction``; a full unit is one shadow read."""
        self._credit += self.fraction
        if self._credit >= 1.0 - 1e-9:
            self._credit -= 1.0
            return True
        return False


def _lowest_cpu_priority() -> None:
    """Run the calling thread (and the threads it starts) at nice 19 where the OS allows it (Linux: per thread)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class ShadowManager:
    """The shadow versions of a server's models, the background reads they run and their agreement.

    ``registry``: the ModelRegistry (leases of the shadow version, the default version of each model); ``memory``:
    the admission's memory budget (``try_reserve``/``release``), or None; ``max_pending``: shadow reads queued or
    running at most (more are skipped).
    """

    def __init__(
        self,
        registry: Any,
        memory: Any = None,
        *,
        max_pending: int = 2,
        match_floor_mm: float = MATCH_FLOOR_MM,
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"shadow max_pending must be >= 1, got {max_pending!r}")
        self._registry = registry
        self._memory = memory
        self.max_pending = max_pending
        self.match_floor_mm = match_floor_mm
        self._targets: dict[str, ShadowTarget] = {}
        self._live = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._pending = 0
        self._turn = asyncio.Lock()  # one shadow read at a time
        self._tasks: set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="shadow", initializer=_lowest_cpu_priority)

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The one low-priority thread of background reads' CPU work (also the promotion guard's evaluation)."""
        return self._executor

    # -- marking -----------------------------------------------------------------------------------------

    def mark(self, name: str, version: str, fraction: float) -> ShadowTarget | None:
        """Shadow ``name:version`` on ``fraction`` of NAME's live reads (0: stop shadowing NAME). Marking another
        version replaces the previous shadow and starts its agreement afresh; the same version keeps it."""
        if not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
            raise InvalidInputError(f"shadow fraction must be in [0, 1], got {fraction!r}")
        if fraction == 0.0:
            target = self._targets.pop(name, None)
            if target is not None:
                logger.info("model %s:%s: shadowing stopped", name, target.version)
            return None
        state = {s.version: s for row in self._registry.list_models() if row.name == name for s in row.versions}
        if version not in state or state[version].state != "READY":
            known = ", ".join(f"{v} {s.state}" for v, s in sorted(state.items())) or "none loaded"
            raise ModelNotFoundError(f"model {name}:{version} is not READY to shadow; versions of {name!r}: {known}")
        if version == self._registry.default_version(name):
            raise InvalidInputError(
                f"model {name}:{version} is the version in default routing; shadow a version that is not "
                "(it is compared with the live answers of this one)"
            )
        target = self._targets.get(name)
        if target is None or target.version != version:
            target = self._targets[name] = ShadowTarget(name, version, fraction)
        target.fraction = fraction
        logger.info("model %s:%s: shadowing %.0f%% of the live reads of %s", name, version, fraction * 100, name)
        return target

    def forget(self, name: str, version: str | None = None) -> None:
        """End the shadow of ``name`` (when it is ``version``, if given): promoted or unloaded."""
        target = self._targets.get(name)
        if target is not None and version in (None, target.version):
            del self._targets[name]

    def target(self, name: str, version: str) -> ShadowTarget | None:
        target = self._targets.get(name)
        return target if target is not None and target.version == version else None

    def targets(self) -> list[ShadowTarget]:
        return list(self._targets.values())

    # -- live work ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def live_work(self) -> Iterator[None]:
        """Held by each live read while it is computed (decode to answer): shadow batches wait meanwhile."""
        self._live += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._live -= 1
            if self._live == 0:
                self._idle.set()

    async def wait_turn(self) -> None:
        """Return once no live read is being computed."""
        while self._live:
            await self._idle.wait()

    # -- shadow reads ------------------------------------------------------------------------------------

    def sample(self, name: str, version: str) -> ShadowTarget | None:
        """The shadow target a live read of ``name:version`` is copied to, or None: only reads of the version in
        default routing are shadowed, a ``fraction`` of them."""
        target = self._targets.get(name)
        if target is None or target.version == version or version != self._registry.default_version(name):
            return None
        return target if target.take() else None

    def submit(
        self, target: ShadowTarget, volume: Volume, live_findings: Sequence[Any], request_id: str, peak_bytes: int
    ) -> bool:
        """Queue the shadow read of one live read (``volume`` with its voxels); False, counted as skipped, when
        ``max_pending`` shadow reads wait already or the memory budget cannot hold ``peak_bytes`` now."""
        if self._pending >= self.max_pending or (self._memory is not None and not self._memory.try_reserve(peak_bytes)):
            target.agreement.reads_skipped += 1
            return False
        self._pending += 1
        task = asyncio.get_running_loop().create_task(
            self._run(target, volume, list(live_findings), request_id, peak_bytes)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _run(
        self, target: ShadowTarget, volume: Volume, live: list[Any], request_id: str, peak_bytes: int
    ) -> None:
        try:
            async with self._turn, self._registry.lease(target.name, target.version, volume.modality) as runner:
                result = await runner.read_in_background(
                    volume, request_id=f"{request_id}/shadow", executor=self._executor, wait_turn=self.wait_turn
                )
            del volume
            if self._targets.get(target.name) is target:  # not replaced or ended meanwhile
                target.agreement.add(live, result.findings, self.match_floor_mm)
        except (RadserveError, RuntimeError) as exc:
            target.agreement.reads_failed += 1
            logger.warning("request %s: shadow read on %s:%s failed: %s", request_id, target.name, target.version, exc)
        except Exception:
            target.agreement.reads_failed += 1
            logger.exception("request %s: shadow read on %s:%s failed", request_id, target.name, target.version)
        finally:
            self._pending -= 1
            if self._memory is not None:
                self._memory.release(peak_bytes)

    async def settle(self) -> None:
        """Wait for the shadow reads queued so far (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)


def agreement_rows(manager: ShadowManager | None) -> list[tuple[str, str, float, Agreement]]:
    """(model, version, fraction, agreement) of each shadow version, for metrics."""
    if manager is None:
        return []
    return [(t.name, t.version, t.fraction, t.agreement) for t in manager.targets()]


__all__ = ["MATCH_FLOOR_MM", "Agreement", "ShadowManager", "ShadowTarget", "agreement_rows", "match_findings"]
