"""The one-line errors: faults an operator must fix, never shown as a traceback.

Anything a daemon or command raises for a bad flag, file, socket or state on
disk derives from `OperatorError`; `tally.app.cli` prints its message as the
one line the operator sees and exits non-zero.  A layer that is not about
operators (the pure SPIFFE code, the wire codecs) raises its own errors, and
the role that meets them decides whether they are the operator's to fix.
"""

from __future__ import annotations


class OperatorError(Exception):
    """Something the operator must fix: shown as one line, never a traceback."""


class CommandError(OperatorError):
    """A command's own refusal or an unreachable daemon."""
