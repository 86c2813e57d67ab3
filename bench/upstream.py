"""The benchmark's upstream: Debian's nginx answering fixed OpenAI-style bodies.

nginx cannot read a JSON body cheaply, so the answers are told apart by path: the
gateway config has one provider per body kind, whose base_url ends in /json/v1, /sse/v1
or /tok/v1. The first two are served with `return 200 "..."` straight from memory (no
file I/O, no upstream of its own), so nginx costs a few microseconds per request and the
numbers measure the gateway. `return` sends a whole stream in one write, which a model
provider never does: /tok/v1 sends the same events one write each, TOKEN_GAP apart, as a
provider streaming token by token does; it needs Debian's echo module for nginx
(libnginx-mod-http-echo) and is left out, with a note, where that is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NGINX_HINT = "nginx is not installed; on Debian/Ubuntu: sudo apt-get install -y nginx"
ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")
ECHO_HINT = ("the token-by-token stream needs nginx's echo module; on Debian/Ubuntu: "
             "sudo apt-get install -y libnginx-mod-http-echo")
TOKEN_GAP = 0.001  # seconds between two events of /tok/v1 (a fast model streams a token per 5-20 ms)

UPSTREAM_MODEL = "bench-upstream-model"
USAGE = {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29}
_WORDS = ["Hello", " there", ",", " this", " is", " a", " fixed", " answer", "."]


def chat_json() -> bytes:
    """A non-streaming chat.completion, the shape OpenAI returns."""
    return json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1764331200, "model": UPSTREAM_MODEL,
        "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(_WORDS), "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {**USAGE, "prompt_tokens_details": {"cached_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0}},
    }, separators=(",", ":")).encode()


def chat_sse() -> bytes:
    return b"".join(chat_sse_events())


def chat_sse_events() -> list[bytes]:
    """A chat.completion.chunk stream as OpenAI sends it when include_usage is set: a role
    chunk, one chunk per word, a finish chunk (each with "usage":null), the usage chunk
    with empty choices, then [DONE]."""
    def chunk(choices: list[object], usage: object = None) -> bytes:
        body = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1764331200,
                "model": UPSTREAM_MODEL, "system_fingerprint": "fp_bench", "choices": choices, "usage": usage}
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    def delta(d: dict[str, str], finish: str | None = None) -> list[object]:
        return [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]

    events = [chunk(delta({"role": "assistant", "content": ""}))]
    events += [chunk(delta({"content": w})) for w in _WORDS]
    events.append(chunk(delta({}, "stop")))
    events.append(chunk([], {**USAGE, "prompt_tokens_details": {"cached_tokens": 0},
                             "completion_tokens_details": {"reasoning_tokens": 0}}))
    events.append(b"data: [DONE]\n\n")
    return events


def _nginx_string(body: bytes) -> str:
    """A double-quoted nginx string. `return` also expands $variables, so refuse any."""
    text = body.decode()
    if "$" in text:
        raise ValueError("fixed bodies must not contain '$' (nginx would expand it)")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def has_echo_module() -> bool:
    return ECHO_MODULE.exists()


def _token_by_token() -> str:
    """The /tok/v1 location: each event written and flushed by itself, TOKEN_GAP apart."""
    steps = []
    for i, event in enumerate(chat_sse_events()):
        if i:
            steps.append(f"echo_sleep {TOKEN_GAP:g};")
        steps.append(f"echo -n {_nginx_string(event)}; echo_flush;")
    return f"""
        location = /tok/v1/chat/completions {{
            default_type text/event-stream;
            {" ".join(steps)}
        }}"""


def render_config(workdir: Path, port: int) -> str:
    """nginx.conf for one worker on 127.0.0.1:port, logging nothing per request."""
    w = workdir
    echo = has_echo_module()
    return f"""
{f"load_module {ECHO_MODULE};" if echo else ""}
worker_processes 1;
daemon off;
pid {w}/nginx.pid;
error_log {w}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {w}/body;
    proxy_temp_path {w}/proxy;
    fastcgi_temp_path {w}/fastcgi;
    uwsgi_temp_path {w}/uwsgi;
    scgi_temp_path {w}/scgi;
    # The gateway keeps its pooled connections for the whole run (default is 1000 requests).
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_max_body_size 1m;
    server {{
        listen 127.0.0.1:{port};
        location = /json/v1/chat/completions {{
            default_type application/json;
            return 200 {_nginx_string(chat_json())};
        }}
        location = /sse/v1/chat/completions {{
            default_type text/event-stream;
            return 200 {_nginx_string(chat_sse())};
        }}{_token_by_token() if echo else ""}
        location / {{ return 404; }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:g}s")


class Nginx:
    """nginx in the foreground (daemon off) with a generated config in `workdir`."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
        if binary is None:
            raise SystemExit(NGINX_HINT)
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        conf = self.workdir / "nginx.conf"
        conf.write_text(render_config(self.workdir, self.port))
        check = subprocess.run([self.binary, "-t", "-q", "-p", str(self.workdir), "-c", str(conf)],
                               capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"nginx rejected the generated config: {check.stderr.strip()}")
        self.proc = subprocess.Popen([self.binary, "-p", str(self.workdir), "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc, "nginx")

    def worker_pids(self) -> list[int]:
        """The worker processes (they, not the master, serve requests)."""
        if self.proc is None:
            return []
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(p) for p in children.read_text().split()]
        except OSError:
            return []

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
