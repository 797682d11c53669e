"""The prompt loop of `chat-api chat`: each reply printed as it streams; Ctrl-C stops a reply, not the loop."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Generator

import httpx

from api.client.conversation import ApiError, Conversation, ReplyCut

HELP = "/new starts a conversation, /regenerate asks again, /history shows it, /quit leaves (or Ctrl-D)"
_LABELS = {"user": "you", "assistant": "model"}


def run(url: str, session: str | None, key: str | None) -> int:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - line editing and recall for input(), where the platform has it

    conversation = Conversation(url, key, session)
    try:
        if session is None:
            conversation.start()
    except (ApiError, httpx.HTTPError) as exc:
        fail(exc, url)
        return 1
    print(f"Conversation {conversation.session} at {url}\n{HELP}; Ctrl-C stops a reply.")
    try:
        return loop(conversation, url)
    finally:
        conversation.close()


def loop(conversation: Conversation, url: str) -> int:
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()  # like a shell: Ctrl-C at the prompt drops the line
            continue
        command = line.strip()
        try:
            if not command:
                continue
            if command == "/quit":
                return 0
            if command == "/new":
                print(f"Conversation {conversation.start()}")
            elif command == "/history":
                show_history(conversation)
            elif command == "/regenerate":
                stream(conversation.reply(None))
            elif command.startswith("/") and " " not in command:
                print(f"unknown command {command}: {HELP}", file=sys.stderr)
            else:
                stream(conversation.reply(line))
        except (ApiError, httpx.HTTPError) as exc:
            fail(exc, url)


def stream(reply: Generator[str, None, None]) -> None:
    try:
        with contextlib.closing(reply):
            for piece in reply:
                sys.stdout.write(piece)
                sys.stdout.flush()
        print()
    except KeyboardInterrupt:
        print("\n[stopped: this turn was not saved]")
    except ReplyCut:
        print("\n[the reply was cut short and this turn was not saved; send it again]")


def show_history(conversation: Conversation) -> None:
    messages = conversation.history()
    if not messages:
        print("(no messages yet)")
    for message in messages:
        print(f"{_LABELS.get(message['role'], message['role'])}: {message['content']}")


def fail(exc: Exception, url: str) -> None:
    sys.stdout.flush()
    if isinstance(exc, ApiError):
        line = f"error: {exc}"
        if exc.status == 401:
            line += " (pass --key or set CHAT_CLIENT_KEY)"
    else:
        line = f"error: cannot reach {url}: {exc}"
    print(line, file=sys.stderr, flush=True)
