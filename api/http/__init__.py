"""HTTP: the app factory, the routes, the streaming response, the uvicorn protocol and server options.

Only this layer speaks HTTP or imports FastAPI and Starlette. It may import everything below it
(`turn`, `store`, `upstream`) and `ops`; nothing below imports it.
A turn's reply is `streaming.py` (plain text) or `events.py` (Server-Sent Events, the AI SDK's UI
message stream). Performance plumbing: `protocol.py` (a turn hears its client leave without a task per
stream) and the chat dispatcher in `app.py` (`ChatAPI`, `ChatDispatch`), inside the middleware.
"""
