"""Running it: graceful drain, Prometheus metrics, log set-up and the container health probe.

It may import the shared modules and the layers under `http` (`turn`, `store`, `upstream`); `http`
imports it, never the other way round.
"""
