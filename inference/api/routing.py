"""The RPCs that decide which version of a model reads (a mixin of ReadingServicer): ShadowModel, PromoteModel,
RollbackModel, and the ListModels rows that show it (versions' promotion and their shadow's agreement).

Operators only, like LoadModel (``_check_management``). PromoteModel's guard is inference.serving.promotion (the
shadow agreement) plus the reasons a client found on the evaluation dataset configured for the model
(``client_reasons``; ``radserve models promote`` evaluates it with ``radserve eval``'s machinery, a client of the API);
``check_only`` tells a client what the server's guard says and what to evaluate, changing nothing.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import grpc

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.api.interceptors import audit_logger
from inference.api.security import tenant_var
from inference.errors import InvalidInputError, PromotionRefusedError, escape_text
from inference.serving import promotion
from inference.serving.registry import ModelListing, VersionState
from inference.serving.shadow import ShadowTarget

logger = logging.getLogger(__name__)

MAX_CLIENT_REASONS = 16  # reasons a client may add to a promotion's guard, each cut to 1000 characters


class RoutingRPCs:
    """Mixed into ReadingServicer, whose ``_registry``, ``shadow``, ``promotion_policy`` and ``_check_management``
    these use."""

    _registry: Any
    shadow: Any
    promotion_policy: Any
    _check_management: Callable[[str], None]

    def _model_infos(self, names: set[str]) -> list[pb.ModelInfo]:
        rows = [r for r in self._registry.list_models() if r.name in names]
        return [model_info(r, with_paths=True, shadow=self.shadow.target) for r in rows]

    async def ShadowModel(  # noqa: N802 - gRPC method name
        self, request: pb.ShadowModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ShadowModelResponse:
        self._check_management("ShadowModel")
        if not request.model or not request.model_version:
            raise InvalidInputError("ShadowModelRequest needs model and model_version (NAME:VERSION)")
        self.shadow.mark(request.model, request.model_version, request.fraction)
        _audit_model_event("shadow", request.model, request.model_version, fraction=request.fraction)
        return pb.ShadowModelResponse(models=self._model_infos({request.model}))

    async def PromoteModel(  # noqa: N802 - gRPC method name
        self, request: pb.PromoteModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.PromoteModelResponse:
        self._check_management("PromoteModel")
        name, version = request.model, request.model_version
        if not name or not version:
            raise InvalidInputError("PromoteModelRequest needs model and model_version (NAME:VERSION)")
        key = f"{name}:{version}"
        self._registry.check_ready(name, version)
        live = self._registry.default_version(name)
        if live == version:
            raise InvalidInputError(f"model {key} already has default routing")
        policy = self.promotion_policy
        target = self.shadow.target(name, version)
        reasons = promotion.shadow_reasons(target.agreement if target else None, policy, key)
        if request.check_only:
            dataset = policy.eval_datasets.get(name)
            return pb.PromoteModelResponse(
                reasons=reasons,
                live_version=live or "",
                eval_dataset=str(dataset) if dataset is not None else "",
                max_sensitivity_drop=policy.max_sensitivity_drop,
                max_fp_per_study_increase=policy.max_fp_per_study_increase,
            )
        reasons += [escape_text(r, 1000) for r in request.client_reasons[:MAX_CLIENT_REASONS]]
        if reasons and not request.force:
            _audit_model_event("promote", name, version, outcome="refused", reasons=reasons)
            raise PromotionRefusedError(f"promotion of {key} refused: " + "; ".join(reasons))
        previous = self._registry.promote(name, version)
        self.shadow.forget(name, version)
        _audit_model_event(
            "promote", name, version, outcome="forced" if reasons else "promoted", previous=previous, reasons=reasons
        )
        return pb.PromoteModelResponse(
            previous_version=previous or "", overridden=reasons, models=self._model_infos({name})
        )

    async def RollbackModel(  # noqa: N802 - gRPC method name
        self, request: pb.RollbackModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.RollbackModelResponse:
        self._check_management("RollbackModel")
        if not request.model:
            raise InvalidInputError("RollbackModelRequest.model is empty")
        rolled_back, serving = self._registry.rollback(request.model)
        _audit_model_event("rollback", request.model, rolled_back, serving=serving)
        return pb.RollbackModelResponse(
            rolled_back_version=rolled_back, serving_version=serving, models=self._model_infos({request.model})
        )


def _audit_model_event(event: str, name: str, version: str, **fields: object) -> None:
    """One audit record per model-management decision (shadow, promote, rollback), with the operator tenant."""
    tenant = tenant_var.get()
    record = {"event": event, "model": name, "model_version": version, "tenant": tenant.name if tenant else "-"}
    record.update({k: v for k, v in fields.items() if v not in (None, [], "")})
    audit_logger.info(
        "%s %s:%s tenant=%s %s",
        event,
        escape_text(name, 64),
        escape_text(version, 64),
        record["tenant"],
        " ".join(f"{k}={escape_text(v, 500)}" for k, v in record.items() if k not in ("event", "model", "tenant")),
        extra={"audit": record},
    )


# An absolute path in a reason (a load error quoting a file), for readers who may not see server paths.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/[^\s'\",:;)]+")


def version_to_proto(
    state: VersionState, *, with_paths: bool = True, shadow: ShadowTarget | None = None
) -> pb.ModelVersion:
    """``with_paths``: the source directory, and reasons as they are (operators); else neither path. ``shadow``: the
    version's shadow marking, when it is its model's shadow (its agreement goes with it)."""
    message = pb.ModelVersion(
        version=state.version,
        state=state.state,
        state_code=pb.VersionState.Value(f"VERSION_STATE_{state.state}"),
        reason=state.reason if with_paths else _ABSOLUTE_PATH.sub("<path>", state.reason),
        source=state.source if with_paths else "",
        weights_sha256=state.weights_sha256,
        promotion=state.promotion,
    )
    if shadow is not None and state.state == "READY":
        message.shadow.CopyFrom(pb.ShadowAgreement(fraction=shadow.fraction, **shadow.agreement.as_dict()))
    return message


def model_info(
    row: ModelListing,
    *,
    with_paths: bool = True,
    shadow: Callable[[str, str], ShadowTarget | None] | None = None,
) -> pb.ModelInfo:
    config = row.config
    return pb.ModelInfo(
        name=row.name,
        task=config.task if config is not None else "",
        modalities=config.modalities if config is not None else (),
        labels=config.labels if config is not None else (),
        versions=[
            version_to_proto(v, with_paths=with_paths, shadow=shadow(row.name, v.version) if shadow else None)
            for v in row.versions
        ],
        device=row.device,
        default_version=row.default_version,
    )
