"""Pure SPIFFE: the standards as functions and small classes, with no I/O.

Nothing here imports trio, sockets, files, clocks or a higher layer; time comes
in as an argument.  That is what lets hypothesis drive every parser and policy.
"""
