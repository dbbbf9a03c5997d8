"""What two or more of Tally's roles share, in layers.

Each layer may import only the layers below it; nothing here imports a role
(``ca``, ``agent``, ``proxy``) except the application room at the top, and a
role never imports another role.  ``tests/test_layers.py`` holds these rules.

``tally.spiffe``   pure SPIFFE: IDs, selectors, the X.509-SVID profile, PEM/DER,
                   bundles, authorization rules, rotation schedule.  No I/O.
``tally.tls``      the data path: pyOpenSSL contexts and verification, the trio
                   TLS stream, the relay's non-waiting ends, plain streams.
``tally.wire``     codecs and their shells: HTTP/1.1 (llhttp), gRPC framing, the
                   Workload API messages and client.
``tally.ops``      operations: config, durations, logs, metrics, health endpoint,
                   clocks, sockets and peer credentials, operator errors.
roles              ``ca``, ``agent``, ``proxy`` (top-level packages, side by side).
``tally.app``      the application: the ``tally`` command, the demo, launching
                   daemons.  The only room that imports the roles.
"""
