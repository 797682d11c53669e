"""A chat turn: validate, admit, lock and read the history, build the context, relay the reply, commit.

`service.py` holds the turn (SPEC §4) and `ChatService`; `context.py` what the upstream is sent;
`slots.py` this worker's generation slots; `usage.py` the range `GET /usage` asks for; `schemas.py` the request and response bodies (pydantic only).
It may import `store` and `upstream`, never `http` or `ops`; it raises `api.errors`, never HTTP errors.
"""
