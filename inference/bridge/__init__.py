"""The archive bridge: `radserve bridge` connects a DICOMweb archive to a radserve server, exactly once.

A client of the API, like ``inference.client``: it talks to the server only through gRPC and imports neither torch
nor MONAI nor any server module, so it installs and runs on a gateway without them (``pip install 'radserve[client]'``).

* ``config``    -- :class:`BridgeConfig`, priority and series rules (YAML), bounds checked at construction
* ``journal``   -- the SQLite journal in ``--state``: each study's state, its outputs, crash and kill -9 safe
* ``archive``   -- the :class:`Archive` interface and its DICOMweb implementation (QIDO-RS, WADO-RS, STOW-RS)
* ``selection`` -- which series of a study each routed model reads, and why the others are left out
* ``service``   -- :class:`Bridge`: the poller, the workers, retries with back-off, the SIGTERM drain
* ``metrics``   -- Prometheus metrics and the audit lines (hashed UIDs, no patient data)
* ``orthanc``   -- a local Orthanc with its DICOMweb plugin, for the tests, the demo and the benchmark
* ``cli``       -- ``radserve bridge``, ``radserve bridge status`` and ``radserve bridge retry``
"""
