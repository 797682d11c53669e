"""HTTP: the app factory, the routes, the streaming response, the uvicorn protocol and server options.

Only this layer speaks HTTP or imports FastAPI and Starlette. It may import everything below it
(`turn`, `store`, `upstream`) and `ops`; nothing below imports it.
Performance plumbing: `protocol.py` (a turn hears its client leave without a task per stream) and the
chat fast path in `app.py` (`ChatAPI`).
"""
