"""redis-chat-api: stateless workers that stream Claude's replies, with conversations in Redis.

A request travels downward and never back up:

    http      the ASGI app, routes, the streaming response, the server protocol
     |
    turn      one chat turn: admit, lock, build the context, relay, commit; how it ended
     |
    store     Redis: key names, Lua scripts, history, locks, admission, renewals
    upstream  Claude through the SDK, the lean transport under it, the event decoder

Beside them: `ops` (drain, metrics, logs, health probe), imported by `http` and free to import
the layers below it; `dev` (the stand-in model and `chat-api dev`), which production code never
imports. Every layer may import the shared vocabulary at this level: `config`, `errors`, `outcomes`.
"""
