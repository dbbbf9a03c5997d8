"""Operations: what every daemon needs to be run by an operator.

Configuration, durations, logs, metrics and the health endpoint, clocks,
sockets and peer credentials, and the one-line operator errors.
"""
