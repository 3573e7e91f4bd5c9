"""A loopback HTTP server speaking the part of the Hugging Face Hub API that uploads and downloads use.

The real ``huggingface_hub`` client talks to it (``HF_ENDPOINT=http://127.0.0.1:<port>``). Repos live in
memory; every commit is recorded. A commit naming a ``parentCommit`` other than the branch head is refused with
412, as the Hub does. Failure injection for tests: ``fail_next_commits`` (answer 500), ``hang_commits`` (never
answer until released, then 500), ``hold_next_commits`` (wait until released, then commit as usual; ``held_done``
is set once answered), ``token`` (401 for any other bearer token).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class Repo:
    def __init__(self, private: bool) -> None:
        self.private = private
        self.branches: dict[str, dict] = {"main": {"sha": _sha(b"init"), "files": {}}}


def _sha(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


class HubState:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.commits: list[dict] = []  # {"repo", "revision", "files": {path: bytes}, "summary"}
        self.bodies: list[bytes] = []  # every request body, for leak checks
        self.requests: list[tuple[str, str]] = []
        self.fail_next_commits = 0
        self.hang_commits = False
        self.hold_next_commits = 0
        self.held_done = threading.Event()
        self.refused: list[dict] = []  # commits refused for a stale parentCommit
        self.release = threading.Event()
        self.token: str | None = None
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState
    endpoint: str

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    # ----- plumbing -------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                data += self.rfile.read(size)
                self.rfile.readline()
        else:
            data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.state.bodies.append(data)
        return data

    def _send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None,
              head: bool = False) -> None:
        body = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else b"")
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if raw is None else "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _authorized(self) -> bool:
        if self.state.token is None:
            return True
        if self.headers.get("Authorization") == f"Bearer {self.state.token}":
            return True
        self._send(401, {"error": "Invalid credentials in Authorization header"})
        return False

    def _route(self, method: str) -> None:
        path = unquote(urlparse(self.path).path)
        self.state.requests.append((method, path))
        body = self._body() if method == "POST" else b""
        parts = path.strip("/").split("/")
        try:
            if method == "POST" and path == "/api/repos/create":
                return self._create(json.loads(body))
            if method == "POST" and path == "/api/validate-yaml":
                return self._send(200, {"errors": [], "warnings": []})
            if parts[0] == "api" and len(parts) >= 4 and parts[1] in ("models", "datasets", "spaces"):
                return self._api(method, parts[2] + "/" + parts[3], parts[4:], body)
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve(parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:]), head=method == "HEAD")
        except KeyError:
            return self._send(404, {"error": "not found"}, {"X-Error-Code": "RepoNotFound"})
        self._send(404, {"error": f"no route {method} {path}"})

    def do_GET(self) -> None:  # noqa: N802
        self._route("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._route("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    # ----- endpoints ------------------------------------------------------------------------------------
    def _create(self, payload: dict) -> None:
        if not self._authorized():
            return
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}" if "/" not in payload["name"] \
            else payload["name"]
        with self.state.lock:
            if repo_id in self.state.repos:
                return self._send(409, {"error": "You already created this model repo", "url": self._url(repo_id)})
            private = payload.get("private") or payload.get("visibility") == "private"
            self.state.repos[repo_id] = Repo(bool(private))
        self._send(200, {"url": self._url(repo_id), "name": repo_id})

    def _url(self, repo_id: str) -> str:
        return f"{self.endpoint}/{repo_id}"

    def _api(self, method: str, repo_id: str, rest: list[str], body: bytes) -> None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        action = rest[0] if rest else ""
        revision = unquote(rest[1]) if len(rest) > 1 else "main"
        if method == "POST" and action == "preupload":
            files = json.loads(body)["files"]
            return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files], "commitOid": repo.branches.get(revision, {}).get("sha")})
        if method == "POST" and action == "commit":
            return self._commit(repo_id, repo, revision, body)
        if method == "POST" and action == "branch":
            if not self._authorized():
                return
            if revision in repo.branches:
                return self._send(409, {"error": "Reference already exists"})
            repo.branches[revision] = {"sha": repo.branches["main"]["sha"], "files": dict(repo.branches["main"]["files"])}
            return self._send(200, {})
        if method == "GET" and action in ("", "revision"):
            return self._info(repo_id, repo, revision if action else "main")
        if method == "GET" and action == "tree":
            files = self._branch(repo, revision)["files"]
            folder = "/".join(rest[2:])
            if folder:  # direct children of a folder; the Hub answers 404 EntryNotFound for a missing one
                files = {p: d for p, d in files.items() if p.startswith(folder + "/") and "/" not in p[len(folder) + 1:]}
                if not files:
                    return self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
            else:
                files = {p: d for p, d in files.items() if "/" not in p}
            return self._send(200, [{"type": "file", "path": p, "size": len(d), "oid": _sha(d)} for p, d in files.items()])
        if method == "POST" and action == "paths-info":
            return self._send(200, [])
        self._send(404, {"error": f"no api route {action}"})

    def _branch(self, repo: Repo, revision: str) -> dict:
        if revision in repo.branches:
            return repo.branches[revision]
        for branch in repo.branches.values():
            if branch["sha"] == revision:
                return branch
        raise KeyError(revision)

    def _info(self, repo_id: str, repo: Repo, revision: str) -> None:
        branch = self._branch(repo, revision)
        self._send(200, {"id": repo_id, "modelId": repo_id, "sha": branch["sha"], "private": repo.private,
                         "siblings": [{"rfilename": p} for p in branch["files"]]})

    def _commit(self, repo_id: str, repo: Repo, revision: str, body: bytes) -> None:
        if not self._authorized():
            return
        if self.state.hang_commits:
            self.state.release.wait(timeout=60)
            return self._send(500, {"error": "released after hanging"})
        with self.state.lock:
            held = self.state.hold_next_commits > 0
            self.state.hold_next_commits -= held
        if held:
            self.state.release.wait(timeout=60)
            try:
                return self._commit_now(repo_id, repo, revision, body)
            finally:
                self.state.held_done.set()
        return self._commit_now(repo_id, repo, revision, body)

    def _commit_now(self, repo_id: str, repo: Repo, revision: str, body: bytes) -> None:
        with self.state.lock:
            if self.state.fail_next_commits > 0:
                self.state.fail_next_commits -= 1
                return self._send(500, {"error": "Internal Server Error (injected)"})
        header, files, deleted = {}, {}, []
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            if item["key"] == "header":
                header = item["value"]
            elif item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                deleted.append(item["value"]["path"])
        if revision not in repo.branches:
            return self._send(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
        with self.state.lock:
            branch = repo.branches[revision]
            parent = header.get("parentCommit")
            if parent and parent != branch["sha"]:
                self.state.refused.append({"repo": repo_id, "summary": header.get("summary"), "parent": parent})
                return self._send(412, {"error": "A commit has happened since. Please refresh and try again."})
            branch["files"].update(files)
            for path in deleted:
                branch["files"].pop(path, None)
            branch["sha"] = _sha(json.dumps(sorted(branch["files"])).encode() + body)
            self.state.commits.append({"repo": repo_id, "revision": revision, "files": files,
                                       "summary": header.get("summary")})
        self._send(200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{branch['sha']}",
                         "commitOid": branch["sha"], "pullRequestUrl": None})

    def _resolve(self, repo_id: str, revision: str, filename: str, head: bool) -> None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}, head=head)
        try:
            branch = self._branch(repo, unquote(revision))
        except KeyError:
            return self._send(404, {"error": "Invalid rev"}, {"X-Error-Code": "RevisionNotFound"}, head=head)
        data = branch["files"].get(filename)
        if data is None:
            return self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}, head=head)
        headers = {"X-Repo-Commit": branch["sha"], "ETag": f'"{_sha(data)}"'}
        self._send(200, raw=data, headers=headers, head=head)


class HubServer:
    """Start with ``HubServer()``; ``.endpoint`` is its URL; ``.state`` its repos and failure switches."""

    def __init__(self) -> None:
        self.state = HubState()
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        handler.endpoint = self.endpoint
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def reset(self) -> None:
        self.state.repos.clear()
        self.state.commits.clear()
        self.state.bodies.clear()
        self.state.requests.clear()
        self.state.fail_next_commits = 0
        self.state.hang_commits = False
        self.state.hold_next_commits = 0
        self.state.refused.clear()
        self.state.release.set()
        self.state.held_done = threading.Event()
        self.state.release = threading.Event()
        self.state.token = None

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.state.repos[repo_id].branches[revision]["files"])
