"""HTTP/1.1 written and read by hand, for requests that no client library would send: a header value
holding a control character, raw bytes in the request line. One connection carries several requests,
so a test can tell whether the server kept it open after a bad one."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import orjson


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-case names; the last value of a repeated header
    body: bytes

    def error(self) -> dict[str, str]:
        """The body as the API's error shape, `{"error": {"type", "message"}}`, or AssertionError."""
        assert self.headers.get("content-type") == "application/json", self.headers
        payload = orjson.loads(self.body)
        assert set(payload) == {"error"} and set(payload["error"]) == {"type", "message"}, payload
        error: dict[str, str] = payload["error"]
        assert all(isinstance(value, str) and value for value in error.values()), payload
        return error


class RawConnection:
    def __init__(self, url: str, timeout: float = 10) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.buffer = b""

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def request(self, raw: bytes) -> RawResponse:
        self.sock.sendall(raw)
        return self.response()

    def response(self) -> RawResponse:
        """The next whole response; ConnectionError if the server closes before it is complete."""
        head = self._until(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int(self._until(b"\r\n"), 16):
                body += self._exactly(size + 2)[:-2]
            self._until(b"\r\n")
        else:
            body = self._exactly(int(headers.get("content-length", "0")))
        return RawResponse(int(status_line.split(" ")[1]), headers, body)

    def closed_by_server(self) -> bool:
        """True once the server has closed its side (after what it had to send was read)."""
        try:
            return not self.buffer and self.sock.recv(1) == b""
        except TimeoutError:
            return False
        except OSError:
            return True

    def _until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            self._fill()
        found, _, self.buffer = self.buffer.partition(marker)
        return found

    def _exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        found, self.buffer = self.buffer[:size], self.buffer[size:]
        return found

    def _fill(self) -> None:
        part = self.sock.recv(65536)
        if not part:
            raise ConnectionError(f"the server closed the connection mid-response: {self.buffer[:200]!r}")
        self.buffer += part


def request(method: str, target: bytes, headers: dict[str, bytes] | None = None, body: bytes = b"") -> bytes:
    """A request's bytes exactly as given: nothing is checked or encoded."""
    lines = [b"%s %s HTTP/1.1" % (method.encode(), target), b"host: test"]
    lines += [b"%s: %s" % (name.encode(), value) for name, value in (headers or {}).items()]
    if body or method in ("POST", "PUT"):
        lines.append(b"content-length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
