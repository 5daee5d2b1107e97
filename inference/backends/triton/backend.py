"""Triton backend: the network runs on a Triton Inference Server, reached with tritonclient's gRPC client.

Client choice: the batcher calls :meth:`TritonBackend.forward` synchronously in its own worker thread (one
call at a time per model version), so a blocking ``tritonclient.grpc.InferenceServerClient`` call there blocks
nothing else; ``tritonclient.grpc.aio`` would need a hop onto the event loop and back for every batch for no
gain. Readiness checks (:meth:`is_ready`, polled by the server's health watcher in a thread) use a second
channel so that a slow inference never delays them.

Inputs travel through **system shared memory** when radserve and Triton share a host (``shared_memory: auto``
with a loopback URL, or ``on``): one region per model version, sized for ``max_batch_size`` items, created
under ``/dev/shm`` and registered with Triton; each batch is copied into it and the request carries only its
name. Otherwise (``off``, or ``auto`` with a remote URL, or a registration Triton refuses under ``auto``) the
tensor goes in the gRPC message. Outputs always come back in the gRPC response.

Failures: a connection refused or broken, or a model that is not ready, is retried ``retries`` times with
exponential back-off, then becomes :class:`~inference.errors.BackendUnavailableError` (gRPC UNAVAILABLE,
retriable); every call has a client-side deadline (``request_timeout_s`` for inference, ``connect_timeout_s``
for the rest), so no read hangs on a dead server. After Triton restarts, the model config is fetched again
and the shared-memory region registered again. The gRPC channel reconnects with a back-off capped at one
second, so reads succeed again right after Triton is back.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from inference.backends.base import Backend
from inference.backends.triton.client import connect
from inference.backends.triton.layout import LAYOUT_PARAMETER, layout_names, parse_layout, rebuild
from inference.config import TritonConfig
from inference.errors import BackendUnavailableError, RadserveError

logger = logging.getLogger(__name__)

__all__ = ["TritonBackend", "is_loopback_url", "use_shared_memory"]

VERSIONS_PARAMETER = "radserve_versions"  # as written by inference.triton.export
# Triton's gRPC status codes (tritonclient reports them as "StatusCode.X") that mean "not there right now".
_UNAVAILABLE = {"StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND", "StatusCode.CANCELLED", "StatusCode.UNKNOWN"}
_TIMEOUT = {"StatusCode.DEADLINE_EXCEEDED"}


def is_loopback_url(url: str) -> bool:
    host = url.rsplit(":", 1)[0].strip("[]") if ":" in url else url
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def use_shared_memory(mode: str, url: str) -> bool:
    return mode == "on" or (mode == "auto" and is_loopback_url(url))


class _RetriableError(Exception):
    """Internal: a retriable failure (message for the final error)."""


class TritonBackend(Backend):
    name = "triton"
    remote = True

    def __init__(
        self,
        model_name: str,
        model_version: str,
        item_shape: Sequence[int],
        settings: TritonConfig,
        *,
        max_batch_size: int,
        device: torch.device | None = None,
    ) -> None:
        """``device`` is where the task preprocesses (the server's device); the network runs on Triton, and
        outputs come back on the CPU."""
        self.settings = settings
        self.model_name = model_name
        self.model_version = model_version
        self.item_shape = tuple(int(s) for s in item_shape)
        self.max_batch_size = int(max_batch_size)
        self._device = device or torch.device("cpu")
        self._lock = threading.Lock()  # forward (worker thread) vs warm-up and close
        self._client: Any = None
        self._probe_client: Any = None
        # What the model config said; None until fetched, reset after any "unavailable".
        self._layout: Any = None
        self._output_names: list[str] = []
        # Triton's version number (export keeps numeric versions; others map through the config): "" = newest.
        self._triton_version = model_version if model_version.isdigit() else ""
        self._shm_wanted = use_shared_memory(settings.shared_memory, settings.url)
        self._shm_handle: Any = None
        self._shm_registered = False
        token = secrets.token_hex(4)
        self._shm_name = f"radserve_{os.getpid()}_{model_name}_{model_version}_{token}"
        self._shm_bytes = self.max_batch_size * int(np.prod(self.item_shape)) * 4
        self._ready: bool | None = None
        self._stale = False  # set by is_ready (another thread) when Triton went away

    @property
    def key(self) -> str:
        return f"{self.model_name}:{self.model_version}"

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def shared_memory(self) -> bool:
        """Whether inputs currently go through system shared memory."""
        return self._shm_wanted

    # -- clients ----------------------------------------------------------------------------------------

    def _new_client(self) -> Any:
        return connect(self.settings.url)  # reconnects within a second of Triton coming back

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self._new_client()
        return self._client

    # -- readiness --------------------------------------------------------------------------------------

    def is_ready(self) -> bool:
        """Triton answers and this model version is ready (one short call; never raises)."""
        from tritonclient.utils import InferenceServerException

        if self._probe_client is None:
            self._probe_client = self._new_client()
        try:
            ready = bool(
                self._probe_client.is_model_ready(
                    self.model_name, self._triton_version or "", client_timeout=self.settings.connect_timeout_s
                )
            )
        except InferenceServerException:
            ready = False
        if ready != self._ready:
            if ready:
                logger.info("Triton model %s is ready at %s", self.key, self.settings.url)
            elif self._ready is not None:
                logger.warning("Triton model %s is unavailable at %s", self.key, self.settings.url)
            if not ready:
                self._stale = True  # the worker thread starts over with the server on its next call
            self._ready = ready
        return ready

    def _forget_server_state(self) -> None:
        """Triton went away: fetch its config and register shared memory again on the next call."""
        self._layout = None
        self._shm_registered = False

    # -- model config -----------------------------------------------------------------------------------

    def _fetch_config(self) -> None:
        from tritonclient.utils import InferenceServerException

        timeout = self.settings.connect_timeout_s
        try:
            config = self.client.get_model_config(self.model_name, client_timeout=timeout, as_json=True)["config"]
        except InferenceServerException as exc:
            raise _RetriableError(f"cannot get the config of model {self.model_name!r}: {exc.message()}") from exc
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        versions = json.loads(params.get(VERSIONS_PARAMETER) or "{}")
        triton_version = str(versions.get(self.model_version, self.model_version))
        try:
            ready = self.client.is_model_ready(self.model_name, triton_version, client_timeout=timeout)
        except InferenceServerException as exc:
            raise _RetriableError(f"cannot ask whether model {self.model_name!r} is ready: {exc.message()}") from exc
        if not ready:
            raise _RetriableError(f"model {self.model_name!r} version {triton_version} is not ready")
        if LAYOUT_PARAMETER not in params:
            raise RadserveError(
                f"Triton model {self.model_name!r} has no {LAYOUT_PARAMETER} parameter; export it with "
                "`radserve triton export`"
            )
        layout = parse_layout(params[LAYOUT_PARAMETER])
        inputs = config.get("input", [])
        dims = tuple(int(d) for d in inputs[0].get("dims", [])) if inputs else ()
        if len(inputs) != 1 or dims != self.item_shape:
            raise RadserveError(
                f"Triton model {self.model_name!r} takes inputs {[i.get('dims') for i in inputs]}, radserve's "
                f"model {self.key} gives {list(self.item_shape)}; export the repository again"
            )
        served = {o["name"] for o in config.get("output", [])}
        missing = [n for n in layout_names(layout) if n not in served]
        if missing:
            raise RadserveError(f"Triton model {self.model_name!r} lacks the outputs {missing}")
        self._input_name = inputs[0]["name"]
        if int(config.get("max_batch_size", 0)) < self.max_batch_size:
            raise RadserveError(
                f"Triton model {self.model_name!r} takes batches of at most {config.get('max_batch_size', 0)}, "
                f"radserve's model {self.key} sends {self.max_batch_size}; export the repository again"
            )
        self._triton_version = triton_version
        self._output_names = layout_names(layout)
        self._layout = layout

    # -- shared memory ----------------------------------------------------------------------------------

    def _ensure_shared_memory(self) -> bool:
        """Create and register the input region if wanted; False when inputs must go in the message."""
        if not self._shm_wanted:
            return False
        if self._shm_registered:
            return True
        import tritonclient.utils.shared_memory as shm
        from tritonclient.utils import InferenceServerException

        if self._shm_handle is None:
            self._shm_handle = shm.create_shared_memory_region(self._shm_name, "/" + self._shm_name, self._shm_bytes)
        timeout = self.settings.connect_timeout_s
        try:
            self.client.unregister_system_shared_memory(self._shm_name, client_timeout=timeout)
            self.client.register_system_shared_memory(
                self._shm_name, "/" + self._shm_name, self._shm_bytes, client_timeout=timeout
            )
        except InferenceServerException as exc:
            if exc.status() in _UNAVAILABLE | _TIMEOUT:
                raise _RetriableError(f"cannot register shared memory: {exc.message()}") from exc
            if self.settings.shared_memory == "on":
                raise RadserveError(
                    f"Triton at {self.settings.url} refused the shared-memory region of model {self.key}: "
                    f"{exc.message()} (triton.shared_memory is 'on'; use 'auto' or 'off' when Triton does not "
                    "share this host's /dev/shm)"
                ) from exc
            logger.warning(
                "Triton at %s refused shared memory (%s); model %s sends inputs in gRPC messages",
                self.settings.url,
                exc.message(),
                self.key,
            )
            self._shm_wanted = False
            self._release_shared_memory(unregister=False)
            return False
        self._shm_registered = True
        logger.info(
            "model %s: inputs go through shared memory %s (%d bytes)", self.key, self._shm_name, self._shm_bytes
        )
        return True

    def _release_shared_memory(self, *, unregister: bool = True) -> None:
        import tritonclient.utils.shared_memory as shm
        from tritonclient.utils import InferenceServerException

        if unregister and self._shm_registered and self._client is not None:
            with contextlib.suppress(InferenceServerException):
                self._client.unregister_system_shared_memory(self._shm_name, client_timeout=1.0)
        self._shm_registered = False
        if self._shm_handle is not None:
            try:
                shm.destroy_shared_memory_region(self._shm_handle)
            except Exception:  # best effort at shutdown
                logger.debug("could not destroy shared memory %s", self._shm_name, exc_info=True)
            self._shm_handle = None

    # -- inference --------------------------------------------------------------------------------------

    def _infer_once(self, array: np.ndarray) -> dict[str, np.ndarray]:
        import tritonclient.grpc as grpcclient
        import tritonclient.utils.shared_memory as shm
        from tritonclient.utils import InferenceServerException

        if self._stale:
            self._stale = False
            self._forget_server_state()
        if self._layout is None:
            self._fetch_config()
        inp = grpcclient.InferInput(self._input_name, list(array.shape), "FP32")
        if self._ensure_shared_memory():
            shm.set_shared_memory_region(self._shm_handle, [array])
            inp.set_shared_memory(self._shm_name, array.nbytes)
        else:
            inp.set_data_from_numpy(array)
        outputs = [grpcclient.InferRequestedOutput(name) for name in self._output_names]
        try:
            result = self.client.infer(
                self.model_name,
                [inp],
                model_version=self._triton_version,
                outputs=outputs,
                client_timeout=self.settings.request_timeout_s,
            )
        except InferenceServerException as exc:
            status, message = exc.status(), exc.message() or ""
            if status in _TIMEOUT:
                raise BackendUnavailableError(
                    f"Triton at {self.settings.url} did not answer model {self.key} within "
                    f"{self.settings.request_timeout_s:g} s (triton.request_timeout_s)"
                ) from exc
            if status in _UNAVAILABLE or "shared memory" in message.lower():
                # Gone, restarting, or restarted without our registration: start over with the server.
                raise _RetriableError(message) from exc
            raise RadserveError(f"Triton failed model {self.key}: {message}") from exc
        outputs = {name: result.as_numpy(name) for name in self._output_names}
        missing = [name for name, value in outputs.items() if value is None]
        if missing:
            raise RadserveError(f"Triton returned no {missing} for model {self.key}")
        return outputs

    def _infer(self, array: np.ndarray) -> dict[str, np.ndarray]:
        attempts = self.settings.retries + 1
        for attempt in range(attempts):
            try:
                return self._infer_once(array)
            except _RetriableError as exc:
                self._forget_server_state()
                if attempt + 1 >= attempts:
                    raise BackendUnavailableError(
                        f"Triton at {self.settings.url} is unavailable for model {self.key} after {attempts} "
                        f"attempt(s): {exc}"
                    ) from exc
                backoff_s = self.settings.retry_backoff_s * 2**attempt
                logger.warning(
                    "model %s: Triton unavailable (%s); retry %d/%d in %.2f s",
                    self.key,
                    exc,
                    attempt + 1,
                    self.settings.retries,
                    backoff_s,
                )
                time.sleep(backoff_s)
        raise AssertionError("unreachable")

    def forward(self, batch: torch.Tensor) -> Any:
        array = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        if tuple(array.shape[1:]) != self.item_shape:
            raise RadserveError(
                f"model {self.key}: batch of shape {tuple(array.shape)}, expected items {self.item_shape}"
            )
        with self._lock:
            limit = self.max_batch_size
            chunks = [self._infer(array[i : i + limit]) for i in range(0, array.shape[0], limit)]
            layout, names = self._layout, list(self._output_names)  # as the last call left them
        merged = {
            # copy: the arrays are read-only views of the response's bytes
            name: torch.from_numpy(
                np.concatenate([c[name] for c in chunks]) if len(chunks) > 1 else chunks[0][name].copy()
            )
            for name in names
        }
        return rebuild(layout, merged)

    def close(self) -> None:
        with self._lock:
            self._release_shared_memory()
            for client in (self._client, self._probe_client):
                if client is not None:
                    try:
                        client.close()
                    except Exception:  # closing a broken channel
                        logger.debug("closing a Triton client failed", exc_info=True)
            self._client = self._probe_client = None
