"""The archive side of the bridge: an :class:`Archive` interface and its DICOMweb implementation.

:class:`DicomWebArchive` speaks QIDO-RS (find studies, series, instances), WADO-RS (series metadata, instances) and
STOW-RS (store the results) through the dicomweb-client package. Its failures are :class:`ArchiveError`s that say
whether a retry may help (connection errors, timeouts, 408, 429, 5xx) or not (any other 4xx, a refused instance).

No URL, UID or response body of the archive ever reaches an error message or the log: dicomweb-client logs each
request's study UID at INFO and requests' exceptions quote the URL, so the bridge silences the former (``cli``) and
reports the latter by HTTP status and the transaction's name only.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

# DICOM JSON tags the bridge reads.
STUDY_UID = "0020000D"
SERIES_UID = "0020000E"
SOP_UID = "00080018"
STUDY_INSTANCES = "00201208"  # NumberOfStudyRelatedInstances
PATIENT_ID = "00100020"
RETRIABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


class ArchiveError(RuntimeError):
    """A DICOMweb transaction that failed. ``status`` is ``HTTP <code>`` or the kind of transport failure
    (``CONNECTION``, ``TIMEOUT``, ``STOW_REFUSED``, ``MALFORMED_RESPONSE``); ``retriable`` says whether trying again
    later may succeed."""

    def __init__(self, status: str, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retriable = retriable


def first_value(item: dict[str, Any], tag: str, default: Any = None) -> Any:
    """The first value of ``tag`` in a DICOM JSON object, or ``default``."""
    values = item.get(tag, {}).get("Value")
    return values[0] if values else default


def values(item: dict[str, Any], tag: str) -> list[Any]:
    return list(item.get(tag, {}).get("Value") or [])


def text_values(item: dict[str, Any], tag: str) -> list[str]:
    """The values of ``tag`` as strings (a person name as its alphabetic form)."""
    out = []
    for value in values(item, tag):
        if isinstance(value, dict):
            value = value.get("Alphabetic", "")
        out.append(str(value))
    return out


@dataclass(frozen=True)
class StudyListing:
    """One study of a QIDO-RS study search: its UID, its instance count, and the attributes asked for."""

    uid: str
    instances: int
    attributes: dict[str, Any]


class BearerTokenFile:
    """requests auth: ``Authorization: Bearer <the file's content>``, the file read again when its mtime changes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stamp: float | None = None
        self._token = ""

    def token(self) -> str:
        stamp = self.path.stat().st_mtime
        if stamp != self._stamp:
            self._token = self.path.read_text().strip()
            self._stamp = stamp
        return self._token

    def __call__(self, request: Any) -> Any:
        request.headers["Authorization"] = f"Bearer {self.token()}"
        return request


class Archive(ABC):
    """What the bridge needs of an archive; :class:`DicomWebArchive` implements it, tests may wrap it."""

    @abstractmethod
    def list_studies(self, fields: Sequence[str]) -> list[StudyListing]:
        raise NotImplementedError(f"{type(self).__name__}.list_studies")

    @abstractmethod
    def list_series(self, study_uid: str) -> list[dict[str, Any]]:
        """The study's series (DICOM JSON), each with Modality, SeriesNumber, SeriesDescription and its count."""
        raise NotImplementedError(f"{type(self).__name__}.list_series")

    @abstractmethod
    def series_metadata(self, study_uid: str, series_uid: str) -> list[dict[str, Any]]:
        """Every instance's metadata (DICOM JSON, no pixel data)."""
        raise NotImplementedError(f"{type(self).__name__}.series_metadata")

    @abstractmethod
    def retrieve(self, study_uid: str, series_uid: str, sop_uids: Sequence[str]) -> list[bytes]:
        """The instances ``sop_uids`` of a series, as DICOM Part 10 files, in the transfer syntax stored."""
        raise NotImplementedError(f"{type(self).__name__}.retrieve")

    @abstractmethod
    def has_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        raise NotImplementedError(f"{type(self).__name__}.has_instance")

    @abstractmethod
    def store(self, study_uid: str, part10: bytes) -> None:
        """Store one DICOM Part 10 object into the study (STOW-RS)."""
        raise NotImplementedError(f"{type(self).__name__}.store")


class DicomWebArchive(Archive):
    """A DICOMweb archive at ``url`` (its root, e.g. ``http://orthanc:8042/dicom-web``).

    Auth, at most one of: ``token``, sent as ``Authorization: Bearer``; ``token_file``, a file holding the bearer
    token, read again whenever it changes (a sidecar or a cron job refreshes short-lived OAuth tokens: Google Cloud
    Healthcare, Azure, dcm4chee behind Keycloak); ``basic_auth``, ``USER:PASSWORD`` (Orthanc's own users). ``ca`` is
    the CA bundle that verifies an HTTPS archive (default: the system's). ``lookback_days`` > 0 lists only studies
    with a StudyDate in that window; ``page_size`` and ``page_overlap`` page through the study list (each page
    starts ``page_overlap`` studies before the previous one ended, so a study that moves between pages while they
    are fetched is still seen).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        token_file: Path | None = None,
        basic_auth: str | None = None,
        ca: Path | None = None,
        timeout_s: float = 60.0,
        lookback_days: int = 0,
        page_size: int = 500,
        page_overlap: int = 20,
        today: Callable[[], dt.date] = dt.date.today,
    ) -> None:
        import requests
        from dicomweb_client import DICOMwebClient

        if sum(x is not None for x in (token, token_file, basic_auth)) > 1:
            raise ValueError("give at most one of the archive's token, token file and basic auth")
        session = requests.Session()
        if ca is not None:
            session.verify = str(ca)
        if token is not None:
            session.headers["Authorization"] = f"Bearer {token}"
        elif token_file is not None:
            session.auth = BearerTokenFile(token_file)
        elif basic_auth is not None:
            user, sep, password = basic_auth.partition(":")
            if not sep:
                raise ValueError("the archive's basic auth must be USER:PASSWORD")
            session.auth = (user, password)
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._session = session
        self._client = DICOMwebClient(url, session=session, timeout=timeout_s)
        # Retries belong to the bridge's journal (back-off per study, visible in status), not to a blocked worker.
        self._client.set_http_retry_params(retry=False)
        self.lookback_days = lookback_days
        self.page_size = page_size
        self.page_overlap = page_overlap
        self._today = today

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        import requests

        try:
            return fn()
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            raise ArchiveError(
                f"HTTP {code}", f"the archive answered {what} with HTTP {code}", retriable=code in RETRIABLE_HTTP
            ) from None
        except requests.Timeout:
            raise ArchiveError("TIMEOUT", f"the archive did not answer {what} in time", retriable=True) from None
        except requests.ConnectionError:
            raise ArchiveError("CONNECTION", f"cannot connect to the archive for {what}", retriable=True) from None
        except requests.RequestException as exc:
            raise ArchiveError("HTTP", f"{what} failed: {type(exc).__name__}", retriable=True) from None
        except (ValueError, KeyError, TypeError, EOFError) as exc:
            # A body that does not parse (JSON, multipart, DICOM): the archive's fault, maybe a proxy's page.
            raise ArchiveError(
                "MALFORMED_RESPONSE",
                f"the archive's answer to {what} did not parse ({type(exc).__name__})",
                retriable=True,
            ) from None

    def list_studies(self, fields: Sequence[str]) -> list[StudyListing]:
        filters: dict[str, Any] = {}
        if self.lookback_days:
            first = self._today() - dt.timedelta(days=self.lookback_days)
            filters["StudyDate"] = f"{first:%Y%m%d}-"
        # By (StudyInstanceUID, PatientID): overlapping pages list an entry twice, and an archive that keys studies by
        # patient too (Orthanc) lists a UID stored under two patient IDs twice; the bridge knows a study by its UID,
        # so the instance counts of its distinct entries add up.
        counts: dict[tuple[str, str], int] = {}
        attributes: dict[str, dict[str, Any]] = {}
        offset = 0
        fields = sorted({"NumberOfStudyRelatedInstances", *fields})
        while True:
            page = self._call(
                "the study search (QIDO-RS)",
                lambda offset=offset: self._client.search_for_studies(
                    limit=self.page_size, offset=offset, fields=fields, search_filters=filters
                ),
            )
            for item in page:
                uid = str(first_value(item, STUDY_UID, "") or "")
                if not uid:
                    continue
                counts[(uid, str(first_value(item, PATIENT_ID, "") or ""))] = int(
                    first_value(item, STUDY_INSTANCES, 0) or 0
                )
                attributes.setdefault(uid, item)
            if len(page) < self.page_size:
                break
            offset += self.page_size - self.page_overlap
        totals: dict[str, int] = {}
        for (uid, _), count in counts.items():
            totals[uid] = totals.get(uid, 0) + count
        return [StudyListing(uid=uid, instances=total, attributes=attributes[uid]) for uid, total in totals.items()]

    def list_series(self, study_uid: str) -> list[dict[str, Any]]:
        return self._call(
            "the series search (QIDO-RS)",
            lambda: self._client.search_for_series(
                study_uid,
                fields=["Modality", "SeriesNumber", "SeriesDescription", "NumberOfSeriesRelatedInstances"],
            ),
        )

    def series_metadata(self, study_uid: str, series_uid: str) -> list[dict[str, Any]]:
        return self._call(
            "the series metadata (WADO-RS)", lambda: self._client.retrieve_series_metadata(study_uid, series_uid)
        )

    def retrieve(self, study_uid: str, series_uid: str, sop_uids: Sequence[str]) -> list[bytes]:
        """The archive's own bytes of each instance chosen: WADO-RS with any transfer syntax, the multipart answer
        split by dicomweb-client, each part kept as it came. Nothing is parsed and written again, so radserve reads
        what the archive holds (and names the file at fault when an instance is malformed); only each part's
        header is read, to keep the instances chosen."""
        from pydicom import dcmread

        wanted = set(sop_uids)
        url = f"{self.url}/studies/{study_uid}/series/{series_uid}"
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'

        def fetch() -> tuple[list[bytes], int]:
            response = self._session.get(url, headers={"Accept": accept}, stream=True, timeout=self.timeout_s)
            response.raise_for_status()
            if response.headers.get("Content-Type", "").startswith("application/dicom"):
                parts = iter([response.content])  # one part, not encapsulated (some archives do this)
            else:
                # dicomweb-client's multipart decoder (it has no public call that returns the parts' bytes)
                parts = self._client._decode_multipart_message(response, stream=True)
            files, found = [], 0
            for part in parts:
                try:
                    header = dcmread(io.BytesIO(part), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                    uid = str(header.SOPInstanceUID)
                except Exception:  # not DICOM: radserve reads it and says so, naming the file
                    files.append(part)
                    continue
                if uid in wanted:
                    files.append(part)
                    found += 1
            return files, found

        files, found = self._call("the series retrieval (WADO-RS)", fetch)
        if found != len(wanted) and len(files) == found:
            raise ArchiveError(
                "INCOMPLETE",
                f"the archive returned {found} of the {len(wanted)} instances chosen (WADO-RS)",
                retriable=True,
            )
        return files

    def has_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        found = self._call(
            "the instance search (QIDO-RS)",
            lambda: self._client.search_for_instances(
                study_uid, series_uid, search_filters={"SOPInstanceUID": sop_uid}
            ),
        )
        return any(first_value(item, SOP_UID) == sop_uid for item in found)

    def store(self, study_uid: str, part10: bytes) -> None:
        from pydicom import dcmread

        dataset = dcmread(io.BytesIO(part10))
        response = self._call(
            "the store (STOW-RS)", lambda: self._client.store_instances([dataset], study_instance_uid=study_uid)
        )
        failed = getattr(response, "FailedSOPSequence", None) if response is not None else None
        if failed:
            reason = getattr(failed[0], "FailureReason", "unknown")
            raise ArchiveError(
                "STOW_REFUSED", f"the archive refused the object (STOW-RS failure reason {reason})", retriable=False
            )
