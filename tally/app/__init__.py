"""The application: the ``tally`` command, the demo, and launching daemons.

The only room that imports the roles, and it names them explicitly.
"""
