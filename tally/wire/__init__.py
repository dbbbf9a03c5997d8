"""Wire codecs and their trio shells: HTTP/1.1, gRPC over HTTP/2, the Workload API.

The codecs (``grpc``, ``workload_pb``) are pure; ``http`` and ``workload_client``
drive them on streams from ``tally.tls``.
"""
