"""A stand-in for the Hugging Face Hub's file endpoint, so Hub code is tested without network.

It answers ``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}`` the way
``huggingface_hub.hf_hub_download`` (2.x, read in ``file_download.py``) needs: ``X-Repo-Commit``
(the 40-hex commit of the revision), ``ETag`` and ``Content-Length`` on success; 404 with
``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound`` (the latter with
``X-Repo-Commit``, which the client uses to cache the file's absence). Files ending in an LFS
suffix may be served like the real Hub serves LFS files: a 302 to another host (the "CDN") with
``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``; the client takes the metadata from the
redirect and downloads from the CDN address.

The server binds 127.0.0.1 on a free port, runs in a daemon thread, answers at most
``max_requests`` requests and stops itself after ``max_lifetime_s`` even if a test forgets to.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import unquote, urlsplit

from typing_extensions import Self

__all__ = ["HubStandIn", "Request"]


@dataclass(frozen=True)
class Request:
    """One request the stand-in received."""

    method: str
    path: str


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubStandIn:
    """A tiny Hub: ``repos[repo_id][revision][filename] = bytes``.

    Args:
        repos: Initial content; more can be added with :meth:`add` while running.
        lfs_suffixes: Files served through a CDN redirect (when ``cdn_host`` is set).
        cdn_host: Host name the LFS redirect points to, e.g. ``"localhost"`` (another host name
            for the same server, so the client treats it as a CDN). ``None``: no redirects.
        max_requests: Requests answered before every further one gets a 503.
        max_lifetime_s: Seconds after which the server stops itself.
    """

    def __init__(
        self,
        repos: dict[str, dict[str, dict[str, bytes]]] | None = None,
        *,
        lfs_suffixes: tuple[str, ...] = (".safetensors",),
        cdn_host: str | None = None,
        max_requests: int = 1000,
        max_lifetime_s: float = 120.0,
    ) -> None:
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        #: Every commit ever added, by (repo id, sha): an old commit stays resolvable after its
        #: branch moves on, as on the Hub.
        self.commits: dict[tuple[str, str], dict[str, bytes]] = {}
        self.requests: list[Request] = []
        self.lfs_suffixes = lfs_suffixes
        self.cdn_host = cdn_host
        self.max_requests = max_requests
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._timer = threading.Timer(max_lifetime_s, self.stop)
        self._timer.daemon = True
        self._stopped = False
        for repo_id, revisions in (repos or {}).items():
            for revision, files in revisions.items():
                self.add(repo_id, revision, files)

    # -- control ------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The endpoint to pass as ``endpoint=``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the port (idempotent); later connections are refused."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._timer.cancel()
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def add(self, repo_id: str, revision: str, files: dict[str, bytes]) -> str:
        """Add (or replace) a revision's files, a new commit; return its sha."""
        sha = self.commit(repo_id, revision, files)
        with self._lock:
            self.repos.setdefault(repo_id, {})[revision] = dict(files)
            self.commits[repo_id, sha] = dict(files)
        return sha

    @staticmethod
    def commit(repo_id: str, revision: str, files: dict[str, bytes]) -> str:
        """The 40-hex commit sha the stand-in gives these files as ``revision`` of ``repo_id``:
        other content, another commit."""
        content = "".join(
            f"{name}:{hashlib.sha256(files[name]).hexdigest()}" for name in sorted(files)
        )
        return hashlib.sha1(f"{repo_id}@{revision}:{content}".encode()).hexdigest()

    def count(self, method: str | None = None, filename: str | None = None) -> int:
        """How many requests matched ``method`` and ended in ``filename``."""
        with self._lock:
            return sum(
                (method is None or r.method == method)
                and (filename is None or r.path.endswith("/" + filename))
                for r in self.requests
            )

    # -- serving ------------------------------------------------------------------------------

    def _resolve(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        revisions = self.repos[repo_id]
        if revision in revisions:
            return self.commit(repo_id, revision, revisions[revision]), revisions[revision]
        return (
            (revision, self.commits[repo_id, revision])
            if (repo_id, revision) in self.commits
            else None
        )

    def _blob(self, sha256: str) -> bytes | None:
        for revisions in self.repos.values():
            for files in revisions.values():
                for data in files.values():
                    if hashlib.sha256(data).hexdigest() == sha256:
                        return data
        return None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.0: one request per connection, so stopping never strands a kept-alive socket.
            protocol_version = "HTTP/1.0"

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep test output clean

            def _answer(self, *, body: bool) -> None:
                path = urlsplit(self.path).path
                with hub._lock:
                    hub.requests.append(Request(self.command, path))
                    over = len(hub.requests) > hub.max_requests
                    status, headers, data = (503, {}, b"") if over else hub._route(path)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body and data:
                    self.wfile.write(data)

        return Handler

    def _route(self, path: str) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) for ``path``; called with the lock held."""
        parts = path.lstrip("/").split("/")
        if len(parts) == 3 and parts[:2] == ["cdn", "blobs"]:
            data = self._blob(parts[2])
            if data is None:
                return 404, {}, b""
            return 200, {"ETag": f'"{parts[2]}"', "Content-Type": "application/octet-stream"}, data
        if len(parts) < 5 or parts[2] != "resolve":
            return 404, {"X-Error-Message": "Not Found"}, b""
        repo_id = f"{unquote(parts[0])}/{unquote(parts[1])}"
        revision = unquote(parts[3])
        filename = unquote("/".join(parts[4:]))
        if repo_id not in self.repos:
            return (
                404,
                {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
                b"",
            )
        resolved = self._resolve(repo_id, revision)
        if resolved is None:
            return (
                404,
                {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"},
                b"",
            )
        commit, files = resolved
        if filename not in files:
            headers = {
                "X-Error-Code": "EntryNotFound",
                "X-Error-Message": "Entry not found",
                "X-Repo-Commit": commit,
            }
            return 404, headers, b""
        data = files[filename]
        if self.cdn_host is not None and filename.endswith(self.lfs_suffixes):
            sha256 = hashlib.sha256(data).hexdigest()
            headers = {
                "Location": f"http://{self.cdn_host}:{self.port}/cdn/blobs/{sha256}",
                "X-Repo-Commit": commit,
                "X-Linked-Etag": f'"{sha256}"',
                "X-Linked-Size": str(len(data)),
                "ETag": f'"{_git_blob_sha1(data)}"',
            }
            return 302, headers, b""
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{_git_blob_sha1(data)}"',
            "Content-Type": "application/octet-stream",
        }
        return 200, headers, data
