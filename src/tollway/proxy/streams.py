"""Streams running per customer key, in this worker process's memory
(server.max_streams_per_key): one more is refused with a 429 before anything is reserved
or forwarded. Per worker, not global: with --workers N a key may run N times the limit
(docs/operations.md, "Resource bounds"). Two dict updates per stream, none per JSON call.
"""

from __future__ import annotations

from tollway.errors import RateLimited


class TooManyStreams(RateLimited):
    code = "too_many_streams"


class StreamSlots:
    __slots__ = ("held", "limit", "running")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running: dict[str, int] = {}  # key id -> streams running
        self.held: dict[str, str] = {}  # request id -> key id, while its stream runs

    def take(self, key_id: str, request_id: str) -> None:
        n = self.running.get(key_id, 0)
        if n >= self.limit:
            raise TooManyStreams(f"This API key already has {n} streams running on this gateway process, its limit "
                                 f"(server.max_streams_per_key = {self.limit}); retry when one has ended.")
        self.running[key_id] = n + 1
        self.held[request_id] = key_id

    def give_back(self, request_id: str) -> None:
        key_id = self.held.pop(request_id, None)
        if key_id is None:
            return
        n = self.running[key_id] - 1
        if n:
            self.running[key_id] = n
        else:
            del self.running[key_id]
