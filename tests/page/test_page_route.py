"""The page route on its own: what it serves and the security headers it sends."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from services.gateway.http.routes.page import router


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    app.include_router(router)
    return TestClient(app)


class _Scan(HTMLParser):
    """Collects what a strict CSP would block: inline scripts, handlers and styles."""

    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self.resources: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in attrs:
            if name.startswith("on"):
                self.problems.append(f"inline handler {name} on <{tag}>")
            if name == "style":
                self.problems.append(f"inline style on <{tag}>")
        if tag == "style":
            self.problems.append("<style> element")
        if tag == "script":
            self._in_script = True
            if not attrs.get("src"):
                self.problems.append("inline <script>")
            else:
                self.resources.append(attrs["src"])
        if tag == "link" and attrs.get("href"):
            self.resources.append(attrs["href"])

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.problems.append("inline script text")


def test_index_has_security_headers(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    csp = response.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"


def test_index_needs_no_inline_code_and_its_resources_exist(client: TestClient) -> None:
    scan = _Scan()
    scan.feed(client.get("/").text)
    assert scan.problems == []
    assert "/static/app.js" in scan.resources
    expected = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for url in scan.resources:
        response = client.get(url)
        assert response.status_code == 200, url
        suffix = url[url.rfind(".") :]
        assert response.headers["content-type"].startswith(expected[suffix]), url
        assert response.headers["x-content-type-options"] == "nosniff"


def test_modules_imported_by_the_app_are_served(client: TestClient) -> None:
    for name in ("app.js", "api.js", "sse.js", "markdown.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200, name


@pytest.mark.parametrize(
    "path",
    ["/static/nope.js", "/static/..%2Fpage.py", "/static/%2e%2e/routes/page.py", "/static/"],
)
def test_unknown_or_escaping_paths_are_not_found(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 404


def test_unchanged_files_revalidate_with_304(client: TestClient) -> None:
    first = client.get("/static/app.js")
    etag = first.headers["etag"]
    assert first.headers["cache-control"] == "no-cache"
    again = client.get("/static/app.js", headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
