"""An HTTP client that keeps cookies the way a browser on loopback does.

httpx's cookie jar (the standard library's policy) never sends a Secure cookie over
http://, while browsers treat loopback as a secure origin; the dashboard's cookies are
always Secure, so this client keeps them itself: name -> value, honouring deletion.
"""

from __future__ import annotations

import re
from typing import Any

import httpx

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class PageClient:
    def __init__(self, base_url: str) -> None:
        self.http = httpx.Client(base_url=base_url, follow_redirects=False, timeout=30)
        self.cookies: dict[str, str] = {}
        self.raw_set_cookies: list[str] = []

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        headers = dict(kw.pop("headers", {}) or {})
        if self.cookies:
            headers["cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        r = self.http.request(method, url, headers=headers, **kw)
        for line in r.headers.get_list("set-cookie"):
            self.raw_set_cookies.append(line)
            name, _, rest = line.partition("=")
            value = rest.split(";", 1)[0].strip('"')
            if "max-age=0" in line.lower() or not value:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        return r

    def get(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("GET", url, **kw)

    def post(self, url: str, data: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
        return self.request("POST", url, data=data or {}, **kw)

    def csrf(self, url: str = "/dashboard/keys") -> str:
        page = self.get(url)
        m = _CSRF.search(page.text)
        assert m, f"no CSRF field on {url} ({page.status_code})"
        return m.group(1)

    def close(self) -> None:
        self.http.close()
