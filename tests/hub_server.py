"""A small in-memory Hugging Face Hub for tests, speaking the HTTP contract huggingface_hub 2.4 uses.

Shapes of requests and responses follow the client source (hf_api.py create_repo/repo_info/
list_repo_tree/get_paths_info/list_repo_refs/create_tag, _commit_api.py preupload + NDJSON
commit, lfs.py batch/upload/verify, file_download.py HEAD/GET resolve), so the real client is
exercised over real HTTP: `HF_ENDPOINT=http://127.0.0.1:PORT HF_HUB_DISABLE_XET=1`.

Not a Hub: one process, memory only, any valid token may write anywhere, no xet, no PRs.
Fault injection: `fail(kind, nth=…)` answers an HTTP error on the nth request of a kind;
`before(kind, nth, hook)` runs a hook first (e.g. a concurrent commit); `tamper()` changes
served bytes without changing the recorded hashes, like a corrupted store or a hostile mirror.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, unquote, urlsplit

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.onnx", "*.onnx_data", "*.plan", "*.pt", "*.pth", "*.h5", "*.msgpack",
                "*.parquet", "*.arrow", "*.npy", "*.npz", "*.gz", "*.zip", "*.tar", "*.png")
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub sends files this large through LFS whatever their name
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
TYPES = {"models": "model", "datasets": "dataset"}


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Entry:
    size: int
    oid: str  # git blob oid (of the pointer file for LFS entries)
    sha256: str | None = None  # LFS entries only; content lives in HubState.lfs
    data: bytes | None = None  # regular entries only

    def tree_json(self, path: str, commit: "Commit") -> dict:
        out = {"type": "file", "oid": self.oid, "size": self.size, "path": path,
               "lastCommit": {"id": commit.oid, "title": commit.title, "date": commit.date}}
        if self.sha256:
            out["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(lfs_pointer(self.sha256, self.size))}
        return out


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    files: dict[str, Entry]
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))


@dataclass
class Repo:
    type: str  # "model" | "dataset"
    id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        oid = self.branches.get(rev) or self.tags.get(rev) or (rev if rev in self.commits else None)
        return self.commits.get(oid) if oid else None

    def commit(self, branch: str, title: str, files: dict[str, Entry]) -> Commit:
        parent = self.branches.get(branch)
        oid = hashlib.sha1(f"{self.id}:{parent}:{title}:{secrets.token_hex(8)}".encode()).hexdigest()
        self.commits[oid] = Commit(oid, parent, title, files)
        self.branches[branch] = oid
        return self.commits[oid]


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.extra = status, message, code, headers or {}, extra


class HubState:
    """Repositories, LFS objects, tokens, request counters and injected faults."""

    def __init__(self, tokens: dict[str, str]):
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.tokens = tokens  # token → user name
        self.uploads: dict[str, tuple[str, int]] = {}  # signed upload key → (oid, size)
        self.counts: dict[str, int] = {}
        self.log: list[tuple[str, str, int]] = []  # (kind, "METHOD path", status)
        self.faults: list[dict] = []

    # -- test controls ----------------------------------------------------------------------
    def fail(self, kind: str, *, nth: int = 1, status: int = 500, times: int = 1) -> None:
        """Answer `status` to requests number nth..nth+times-1 of `kind`, counted from now."""
        with self.lock:
            start = self.counts.get(kind, 0)
            self.faults.append({"kind": kind, "first": start + nth, "last": start + nth + times - 1, "status": status})

    def before(self, kind: str, hook: Callable[["HubState"], None], *, nth: int = 1) -> None:
        with self.lock:
            self.faults.append({"kind": kind, "first": self.counts.get(kind, 0) + nth, "hook": hook})

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def tamper(self, repo_id: str, path: str, data: bytes, *, repo_type: str = "model", revision: str = "main") -> None:
        """Serve `data` for `path` while every recorded hash still claims the original content."""
        with self.lock:
            entry = self.repo(repo_id, repo_type).resolve(revision).files[path]
            if entry.sha256:
                self.lfs[entry.sha256] = data
            else:
                entry.data = data

    def direct_commit(self, repo_id: str, path: str, data: bytes, *, repo_type: str = "model") -> str:
        """A commit made by someone else (e.g. in the web UI) while a client is working."""
        with self.lock:
            repo = self.repo(repo_id, repo_type)
            files = dict(repo.resolve("main").files)
            files[path] = Entry(len(data), git_blob_oid(data), data=data)
            return repo.commit("main", f"Concurrent edit of {path}", files).oid

    def count(self, kind: str) -> int:
        return self.counts.get(kind, 0)

    def _on_request(self, kind: str) -> int | None:
        """Count the request; run hooks due now; return a status to fail with, if one is due."""
        with self.lock:
            n = self.counts[kind] = self.counts.get(kind, 0) + 1
            due = [f for f in self.faults if f["kind"] == kind and f["first"] <= n <= f.get("last", f["first"])]
        status = None
        for f in due:
            if "hook" in f:
                f["hook"](self)
            else:
                status = f["status"]
        return status


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer carries Content-Length
    state: HubState
    base_url: str

    def log_message(self, *args) -> None:  # quiet: the state keeps its own log
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # -- plumbing -----------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, ctype: str = "application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        user = self.state.tokens.get(token)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _dispatch(self, method: str) -> None:
        self.body = self._body()
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        kind, handler = _route(method, parts)
        status = 404
        try:
            if handler is None:
                raise HubError(404, f"no such endpoint in the test hub: {method} {url.path}")
            fail = self.state._on_request(kind)
            if fail is not None:
                raise HubError(fail, f"injected failure ({kind} request {self.state.count(kind)})")
            status = handler(self, parts) or 200
        except HubError as exc:
            status = exc.status
            headers = dict(exc.headers)
            if exc.code:
                headers["X-Error-Code"] = exc.code
            headers["X-Error-Message"] = exc.message
            self._json(exc.status, {"error": exc.message, **exc.extra}, headers)
        self.state.log.append((kind, f"{method} {url.path}", status))

    # -- helpers for handlers -------------------------------------------------------------------
    def repo_for(self, rtype: str, repo_id: str, *, write: bool = False) -> Repo:
        user = self._user()
        if write and user is None:
            raise HubError(401, "You must be authenticated to write", "RepoNotFound")
        repo = self.state.repos.get((rtype, repo_id))
        if repo is None or (repo.private and user is None):
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def commit_for(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def url_prefix(self, rtype: str) -> str:
        return "" if rtype == "model" else "datasets/"


# -- endpoints ------------------------------------------------------------------------------------
def _create_repo(h: _Handler, parts):
    if h._user() is None:
        raise HubError(401, "You must be authenticated to create a repo")
    payload = json.loads(h.body)
    rtype = payload.get("type") or "model"
    repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
    with h.state.lock:
        if (rtype, repo_id) in h.state.repos:
            # The Hub answers 409 with the repo URL; create_repo(exist_ok=True) reads it.
            raise HubError(409, "You already created this repo", url=f"{h.base_url}/{h.url_prefix(rtype)}{repo_id}")
        repo = Repo(rtype, repo_id, payload.get("visibility") == "private" or bool(payload.get("private")))
        data = GITATTRIBUTES
        repo.commit("main", "initial commit", {".gitattributes": Entry(len(data), git_blob_oid(data), data=data)})
        h.state.repos[(rtype, repo_id)] = repo
    h._json(200, {"url": f"{h.base_url}/{h.url_prefix(rtype)}{repo_id}", "name": repo_id, "id": repo_id})


def _validate_yaml(h: _Handler, parts):
    import yaml

    content = json.loads(h.body).get("content", "")
    errors = []
    if content.startswith("---"):
        try:
            meta = yaml.safe_load(content.split("---", 2)[1])
            if meta is not None and not isinstance(meta, dict):
                errors.append({"message": "metadata must be a mapping"})
        except (yaml.YAMLError, IndexError) as exc:
            errors.append({"message": f"invalid YAML: {exc}"})
    h._json(400 if errors else 200, {"errors": errors, "warnings": []})


def _repo_info(h: _Handler, parts):
    rtype, repo_id = TYPES[parts[1]], f"{parts[2]}/{parts[3]}"
    repo = h.repo_for(rtype, repo_id)
    commit = h.commit_for(repo, parts[5] if len(parts) > 5 else "main")
    h._json(200, {
        "id": repo_id, "author": parts[2], "sha": commit.oid, "private": repo.private, "disabled": False,
        "gated": False, "lastModified": commit.date, "createdAt": repo.commits[next(iter(repo.commits))].date,
        "tags": [], "downloads": 0, "likes": 0,
        "siblings": [{"rfilename": p} for p in sorted(commit.files)],
    })


def _tree(h: _Handler, parts):
    rtype, repo_id = TYPES[parts[1]], f"{parts[2]}/{parts[3]}"
    repo = h.repo_for(rtype, repo_id)
    commit = h.commit_for(repo, parts[5])
    base = "/".join(parts[6:]).strip("/")
    recursive = h.query.get("recursive", ["false"])[0].lower() in ("1", "true")
    prefix = base + "/" if base else ""
    out, dirs = [], set()
    for path in sorted(commit.files):
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix):]
        segments = rest.split("/")
        for i in range(1, len(segments)):  # folders, once each, as the Hub lists them
            d = prefix + "/".join(segments[:i])
            if d not in dirs and (recursive or i == 1):
                dirs.add(d)
                out.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d})
        if recursive or len(segments) == 1:
            out.append(commit.files[path].tree_json(path, commit))
    if base and not out:
        raise HubError(404, f"{base} does not exist on {parts[5]}", "EntryNotFound")
    h._json(200, out)


def _paths_info(h: _Handler, parts):
    rtype, repo_id = TYPES[parts[1]], f"{parts[2]}/{parts[3]}"
    commit = h.commit_for(h.repo_for(rtype, repo_id), parts[5])
    form = parse_qs(h.body.decode())  # the client posts form data: paths=a&paths=b&expand=False
    out = [commit.files[p].tree_json(p, commit) for p in form.get("paths", []) if p in commit.files]
    h._json(200, out)


def _refs(h: _Handler, parts):
    repo = h.repo_for(TYPES[parts[1]], f"{parts[2]}/{parts[3]}")
    h._json(200, {
        "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in repo.branches.items()],
        "converts": [], "pullRequests": [],
        "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": c} for t, c in repo.tags.items()],
    })


def _preupload(h: _Handler, parts):
    repo = h.repo_for(TYPES[parts[1]], f"{parts[2]}/{parts[3]}", write=True)
    existing = h.commit_for(repo, parts[5]).files
    files = []
    for f in json.loads(h.body)["files"]:
        sample = base64.b64decode(f["sample"])
        lfs = f["size"] >= LFS_MIN_SIZE or b"\0" in sample or any(fnmatch.fnmatch(f["path"], p) for p in LFS_PATTERNS)
        old = existing.get(f["path"])
        files.append({
            "path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
            "oid": (old.sha256 or old.oid) if old else None,
        })
    h._json(200, {"files": files})


def _lfs_batch(h: _Handler, parts):
    rtype = "dataset" if parts[0] == "datasets" else "model"
    org, name = parts[-6], parts[-5].removesuffix(".git")
    repo = h.repo_for(rtype, f"{org}/{name}", write=True)
    req = json.loads(h.body)
    objects = []
    for obj in req["objects"]:
        item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
        if obj["oid"] not in h.state.lfs:
            key = secrets.token_hex(16)
            h.state.uploads[key] = (obj["oid"], obj["size"])
            item["actions"] = {
                "upload": {"href": f"{h.base_url}/__lfs/upload/{key}", "header": {}},
                "verify": {"href": f"{h.base_url}/__lfs/verify/{repo.type}/{repo.id}", "header": {}},
            }
        objects.append(item)
    h._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(), ctype="application/vnd.git-lfs+json")


def _lfs_upload(h: _Handler, parts):
    # Like a pre-signed storage URL: the key in the path is the authorization, no token sent.
    oid, size = h.state.uploads.get(parts[2], (None, None))
    if oid is None:
        raise HubError(403, "unknown or expired upload URL")
    if len(h.body) != size or hashlib.sha256(h.body).hexdigest() != oid:
        raise HubError(400, f"uploaded content does not match oid {oid} / size {size}")
    with h.state.lock:
        h.state.lfs[oid] = h.body
        h.state.uploads.pop(parts[2], None)
    h._send(200)


def _lfs_verify(h: _Handler, parts):
    h.repo_for(parts[2], f"{parts[3]}/{parts[4]}", write=True)
    obj = json.loads(h.body)
    stored = h.state.lfs.get(obj["oid"])
    if stored is None or len(stored) != obj["size"]:
        raise HubError(404, f"object {obj['oid']} not found")
    h._json(200, {"success": True})


def _commit(h: _Handler, parts):
    rtype, repo_id, branch = TYPES[parts[1]], f"{parts[2]}/{parts[3]}", parts[5]
    repo = h.repo_for(rtype, repo_id, write=True)
    lines = [json.loads(line) for line in h.body.splitlines() if line.strip()]
    header = next(item["value"] for item in lines if item["key"] == "header")
    with h.state.lock:
        if branch not in repo.branches:
            raise HubError(400, f"cannot commit to {branch}: not a branch", "RevisionNotFound")
        head = repo.branches[branch]
        if header.get("parentCommit") and header["parentCommit"] != head:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[head].files)
        for item in lines:
            _apply_operation(h.state, files, item)
        commit = repo.commit(branch, header.get("summary", ""), files)
    h._json(200, {"commitUrl": f"{h.base_url}/{h.url_prefix(rtype)}{repo_id}/commit/{commit.oid}",
                  "commitOid": commit.oid, "success": True, "pullRequestUrl": None})


def _apply_operation(state: HubState, files: dict[str, Entry], item: dict) -> None:
    key, value = item["key"], item["value"]
    if key == "file":
        data = base64.b64decode(value["content"])
        files[value["path"]] = Entry(len(data), git_blob_oid(data), data=data)
    elif key == "lfsFile":
        stored = state.lfs.get(value["oid"])
        if stored is None:
            raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
        files[value["path"]] = Entry(len(stored), git_blob_oid(lfs_pointer(value["oid"], len(stored))),
                                     sha256=value["oid"])
    elif key == "deletedFile":
        if files.pop(value["path"], None) is None:
            raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
    elif key == "deletedFolder":
        prefix = value["path"].rstrip("/") + "/"
        for p in [p for p in files if p.startswith(prefix)]:
            del files[p]
    elif key != "header":
        raise HubError(400, f"unknown commit operation {key}")


def _tag(h: _Handler, parts):
    repo = h.repo_for(TYPES[parts[1]], f"{parts[2]}/{parts[3]}", write=True)
    commit = h.commit_for(repo, parts[5])
    tag = json.loads(h.body)["tag"]
    with h.state.lock:
        if tag in repo.tags:
            raise HubError(409, f"Tag {tag} already exists")
        repo.tags[tag] = commit.oid
    h._json(200, {})


def _resolve(h: _Handler, parts):
    rtype = "dataset" if parts[0] == "datasets" else "model"
    parts = parts[1:] if rtype == "dataset" else parts
    repo = h.repo_for(rtype, f"{parts[0]}/{parts[1]}")
    commit = h.commit_for(repo, parts[3])
    path = "/".join(parts[4:])
    entry = commit.files.get(path)
    if entry is None:
        raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
    headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{entry.oid}"', "Accept-Ranges": "none"}
    if entry.sha256:
        data = h.state.lfs[entry.sha256]
        headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": entry.size})
    else:
        data = entry.data
    headers["Content-Length"] = len(data)
    h._send(200, data, headers, ctype="application/octet-stream")


def _route(method: str, p: list[str]):
    """(request kind, handler) for a path split on '/'; kinds name what fault injection targets."""
    n = len(p)
    if p[:1] == ["api"]:
        if method == "POST" and p[1:3] == ["repos", "create"]:
            return "create", _create_repo
        if method == "POST" and p[1:] == ["validate-yaml"]:
            return "validate-yaml", _validate_yaml
        if n >= 4 and p[1] in TYPES:
            sub = p[4] if n > 4 else None
            if method == "GET" and (sub is None or (sub == "revision" and n == 6)):
                return "info", _repo_info
            if method == "GET" and sub == "tree" and n >= 6:
                return "tree", _tree
            if method == "GET" and sub == "refs":
                return "refs", _refs
            if method == "POST" and n == 6 and sub in ("paths-info", "preupload", "commit", "tag"):
                return sub, {"paths-info": _paths_info, "preupload": _preupload, "commit": _commit, "tag": _tag}[sub]
    if method == "POST" and p[-4:] == ["info", "lfs", "objects", "batch"] and p[-5].endswith(".git"):
        return "lfs-batch", _lfs_batch
    if p[:2] == ["__lfs", "upload"] and method == "PUT":
        return "lfs-upload", _lfs_upload
    if p[:2] == ["__lfs", "verify"] and method == "POST":
        return "lfs-verify", _lfs_verify
    q = p[1:] if p[:1] == ["datasets"] else p
    if method in ("GET", "HEAD") and len(q) >= 5 and q[2] == "resolve":
        return "resolve", _resolve
    return "unknown", None


class HubServer:
    """The server on 127.0.0.1 with an ephemeral port, serving from a daemon thread."""

    def __init__(self, tokens: dict[str, str] | None = None):
        self.state = HubState(tokens or {})
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        handler.base_url = self.url
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="test-hub", daemon=True)

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
