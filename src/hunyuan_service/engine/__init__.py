"""The engine: admission, the FIFO scheduler, jobs and their events, retention and metrics.

Nothing in this package knows about HTTP.
"""
