"""`chat-api serve` (production), `chat-api dev` (everything on one machine) and `chat-api chat` (a terminal client)."""

from __future__ import annotations

import argparse
import os

from api.config import load_settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="chat-api", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the production server (uvicorn)")
    serve.add_argument("--host", help="address to bind (CHAT_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (CHAT_PORT, default 8000)")
    serve.add_argument("--workers", type=int, help="worker processes (CHAT_WORKERS, default 1)")

    dev = commands.add_parser("dev", help="run with an embedded Redis and a local stand-in model")
    dev.add_argument("--host", help="address to bind (CHAT_HOST, default 127.0.0.1)")
    dev.add_argument("--port", type=int, help="port (CHAT_PORT, default 8000)")

    chat = commands.add_parser("chat", help="chat with a running server from the terminal")
    chat.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default %(default)s)")
    chat.add_argument("--session", help="continue this conversation (default: a new one)")
    chat.add_argument("--key", help="an API key, when the server has keys (or CHAT_CLIENT_KEY)")

    args = parser.parse_args(argv)
    if args.command == "chat":
        # Imported here: the client needs none of the server's settings, and the server none of it.
        from api.client.terminal import run

        raise SystemExit(
            run(args.url.rstrip("/"), args.session, args.key or os.environ.get("CHAT_CLIENT_KEY"))
        )
    if args.command == "serve":
        # Flags become environment so that every worker process reads the same settings.
        for flag, name in (("host", "CHAT_HOST"), ("port", "CHAT_PORT"), ("workers", "CHAT_WORKERS")):
            if getattr(args, flag) is not None:
                os.environ[name] = str(getattr(args, flag))
        settings = load_settings()
        from api.http.server import serve as run_server

        run_server(settings)
    else:
        from api.dev.run import run_dev

        run_dev(args.host, args.port)
