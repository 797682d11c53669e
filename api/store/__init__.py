"""Redis: every key, script and round trip the service makes.

`keys.py` names the keys (one hash tag per session), `scripts.py` loads `lua/` and runs it by SHA,
`history.py` begins and commits turns, `locks.py` the session lock, `admission.py` each caller's limits,
`renewals.py` keeps locks and leases alive, `redis.py` builds the client.
It imports only redis-py and the shared modules at the package's top (`config`, `errors`).
"""
