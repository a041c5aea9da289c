"""Helpers for the web console's tests: a browser-like httpx client with the console's cookies and
CSRF tokens, and reading what a page shows."""

from __future__ import annotations

import html
import re

import httpx

CSRF_INPUT = re.compile(r'name="csrf_token" value="([0-9a-f]{64})"')


class Console:
    """One browser session on /console: cookies kept, redirects not followed (the tests look at them)."""

    def __init__(self, url: str):
        self.http = httpx.Client(base_url=url, timeout=60)
        self._csrf: str | None = None

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *exc) -> None:
        self.http.close()

    def get(self, path: str, **kwargs) -> httpx.Response:
        response = self.http.get(path, **kwargs)
        if match := CSRF_INPUT.search(response.text):
            self._csrf = match.group(1)
        return response

    def csrf(self) -> str:
        for page in ("/console/sign-in", "/console/projects"):  # signed out / signed in (sign-in redirects)
            if self._csrf is None:
                self.get(page)
        return self._csrf

    def post(self, path: str, data: dict | None = None, *, csrf: bool = True, files=None) -> httpx.Response:
        data = dict(data or {})
        if csrf:
            data.setdefault("csrf_token", self.csrf())
        response = self.http.post(path, data=data, files=files)
        if match := CSRF_INPUT.search(response.text):
            self._csrf = match.group(1)
        return response

    def sign_in(self, token: str) -> httpx.Response:
        response = self.post("/console/sign-in", {"api_token": token})
        assert response.status_code == 303, response.text
        self._csrf = None  # a new session: a new CSRF token
        return response


def text_of(response: httpx.Response) -> str:
    """The page's text as a reader sees it (entities decoded, tags and runs of white space folded)."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", response.text)))


def shown(message: str, response: httpx.Response) -> bool:
    """Whether the page shows `message` (an API error message) to its reader."""
    return re.sub(r"\s+", " ", message) in text_of(response)
