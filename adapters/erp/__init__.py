"""The ERP side of ISA-95 report-back.

- :mod:`adapters.erp.client`: :func:`~adapters.erp.client.deliver` POSTs one callback to an
  ERP and classifies failures as retryable or not.
- :mod:`adapters.erp.receiver`: :class:`~adapters.erp.receiver.ErpReceiver`, a small HTTP
  server that plays the ERP (``mes sim erp``) and records every callback.

Nothing is re-exported here on purpose: the worker imports only the client and should not
pay for Litestar and uvicorn, which only the receiver needs. Nothing here imports ``mes``.
"""
