"""Claude, through the official SDK: `client.py` opens a reply and reads it.

Performance plumbing: `transport.py`, a lean HTTP/1.1 transport under the SDK's httpx2 client (parsing
with httptools; `CHAT_UPSTREAM_TRANSPORT=httpx` puts httpx's own back), `direct.py`, the SDK's request
made once and sent on that transport with the SDK's retry rules (`CHAT_UPSTREAM_CLIENT=sdk` has the SDK
build each one), and `events.py`, a decoder for the Messages API's server-sent events that reads raw bytes.
It imports only the SDK, its HTTP stack (httpx2, httptools), orjson and the shared modules (`config`, `errors`).
"""
