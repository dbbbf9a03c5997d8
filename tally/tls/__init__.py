"""The data path: Tally's one TLS layer and its plain-socket twin.

Above ``tally.spiffe`` (authorization of the peer's chain), below everything
that moves bytes over a network.
"""
