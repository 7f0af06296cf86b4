"""A Hugging Face hub on loopback: folders served as model repositories over the hub's download API.

huggingface_hub (and so transformers) is pointed at it with HF_ENDPOINT and speaks to it exactly as to the
real hub; nothing in the service knows the difference. It answers what a download asks, the way the hub
answers it:

- `GET /api/models/{repo}/revision/{revision}`: the repository's commit (`sha`) and files (`siblings`);
- `GET /api/models/{repo}/tree/{revision}?recursive=...`: each file's size and blob id, and for LFS files
  (the weights) their sha256 and size;
- `HEAD` and `GET /{repo}/resolve/{revision}/{path}`: `X-Repo-Commit`, `ETag` and `Content-Length`; an LFS
  file answers with a redirect to its content on another origin (`X-Linked-Etag`, `X-Linked-Size`), as the
  hub redirects to its CDN (a second port here), and that content honours `Range` (resumed downloads);
- errors with the hub's `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound).

A file can be slowed down (`slow`), so that a test sees a download in flight. Every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")
CHUNK = 64 * 1024


@dataclass
class Repository:
    commit: str
    files: dict[str, bytes]

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)


@dataclass
class LocalHub:
    port: int = 0
    cdn_port: int = 0
    repositories: dict[str, Repository] = field(default_factory=dict)
    # File name -> seconds its content takes to send.
    slow: dict[str, float] = field(default_factory=dict)
    # File names whose content is answered with a server error (their metadata still answers).
    failing: set[str] = field(default_factory=set)
    requests: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def publish(self, repo_id: str, folder: Path) -> str:
        """Serve every file of `folder` as `repo_id` at a new commit; return the commit."""
        files = {
            path.relative_to(folder).as_posix(): path.read_bytes()
            for path in folder.rglob("*")
            if path.is_file()
        }
        commit = secrets.token_hex(20)
        self.repositories[repo_id] = Repository(commit=commit, files=files)
        return commit

    def lfs_file(self, sha256: str) -> tuple[str, bytes] | None:
        for repository in self.repositories.values():
            for path, data in repository.files.items():
                if repository.is_lfs(path) and hashlib.sha256(data).hexdigest() == sha256:
                    return path, data
        return None


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<revision>[^/?]+)")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")
LFS = re.compile(r"^/lfs/(?P<sha256>[0-9a-f]{64})$")


def handler_for(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_HEAD(self) -> None:
            self.answer(body=False)

        def do_GET(self) -> None:
            self.answer(body=True)

        def log_message(self, format: str, *args: object) -> None:
            pass

        def answer(self, body: bool) -> None:
            hub.requests.append(f"{self.command} {self.path}")
            path = unquote(urlsplit(self.path).path)
            if match := API.match(path):
                self.api(match, body)
            elif match := RESOLVE.match(path):
                self.resolve(match, body)
            elif match := LFS.match(path):
                found = hub.lfs_file(match["sha256"])
                if found is None:
                    self.error(404, "EntryNotFound")
                else:
                    self.content(found[1], body, name=found[0], headers={})
            else:
                self.error(404, "RepoNotFound")

        def repository(self, repo_id: str, revision: str) -> Repository | None:
            repository = hub.repositories.get(repo_id)
            if repository is None:
                self.error(404, "RepoNotFound")
                return None
            if revision not in ("main", repository.commit):
                self.error(404, "RevisionNotFound")
                return None
            return repository

        def api(self, match: re.Match[str], body: bool) -> None:
            repository = self.repository(match["repo"], unquote(match["revision"]))
            if repository is None:
                return
            if match["kind"] == "revision":
                document: object = {
                    "id": match["repo"],
                    "modelId": match["repo"],
                    "sha": repository.commit,
                    "private": False,
                    "siblings": [{"rfilename": path} for path in sorted(repository.files)],
                }
            else:
                document = [
                    self.tree_entry(repository, path, data) for path, data in sorted(repository.files.items())
                ]
            self.content(
                json.dumps(document).encode(), body, name=None, headers={"Content-Type": "application/json"}
            )

        def tree_entry(self, repository: Repository, path: str, data: bytes) -> dict[str, object]:
            entry: dict[str, object] = {
                "type": "file",
                "oid": git_blob_id(data),
                "size": len(data),
                "path": path,
            }
            if repository.is_lfs(path):
                entry["lfs"] = {
                    "oid": hashlib.sha256(data).hexdigest(),
                    "size": len(data),
                    "pointerSize": 134,
                }
            return entry

        def resolve(self, match: re.Match[str], body: bool) -> None:
            repository = self.repository(match["repo"], unquote(match["revision"]))
            if repository is None:
                return
            path = match["path"]
            data = repository.files.get(path)
            if data is None:
                self.error(404, "EntryNotFound", commit=repository.commit)
                return
            headers = {"X-Repo-Commit": repository.commit}
            if repository.is_lfs(path):
                sha256 = hashlib.sha256(data).hexdigest()
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{hub.cdn_port}/lfs/{sha256}")
                self.send_header("X-Linked-Etag", f'"{sha256}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("ETag", f'"{git_blob_id(data)}"')
                self.send_header("X-Repo-Commit", repository.commit)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            headers["ETag"] = f'"{git_blob_id(data)}"'
            self.content(data, body, name=path, headers=headers)

        def content(self, data: bytes, body: bool, name: str | None, headers: dict[str, str]) -> None:
            if body and name in hub.failing:
                self.error(500, "InternalServerError")
                return
            start = 0
            if (ranged := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))) is not None:
                start = min(int(ranged[1]), len(data))
            self.send_response(206 if start else 200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data) - start))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if not body:
                return
            seconds = hub.slow.get(name, 0.0) if name is not None else 0.0
            chunks = [data[offset : offset + CHUNK] for offset in range(start, len(data), CHUNK)]
            for chunk in chunks:
                self.wfile.write(chunk)
                if seconds:
                    time.sleep(seconds / len(chunks))

        def error(self, status: int, code: str, commit: str | None = None) -> None:
            message = json.dumps({"error": code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", code)
            if commit is not None:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(message)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(message)

    return Handler


@contextmanager
def running_hub() -> Iterator[LocalHub]:
    hub = LocalHub()
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), handler_for(hub)) for _ in ("hub", "cdn")]
    hub.port, hub.cdn_port = (server.server_address[1] for server in servers)
    threads = []
    for server in servers:
        server.daemon_threads = True
        threads.append(threading.Thread(target=server.serve_forever, daemon=True))
        threads[-1].start()
    try:
        yield hub
    finally:
        for server, thread in zip(servers, threads, strict=True):
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
