"""A small Hugging Face Hub-compatible HTTP server for tests: the endpoints `huggingface_hub` uses to create a
repo, upload (preupload, LFS batch + upload + verify, NDJSON commit), list (repo info, tree, paths-info) and
download (resolve, with Range) — enough that the real client pushes and pulls against it unchanged.

Repos live in memory, file contents on disk (content-addressed by sha256). Private repos answer 401 to
anonymous readers, as the Hub does; writes need a known token. ``faults`` cuts chosen downloads short so an
interrupted pull can be tested; ``requests`` records what the client asked for.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".png", ".jpg", ".model", ".h5", ".msgpack",
                ".onnx", ".gz", ".zip", ".npy", ".npz", ".parquet", ".arrow")
GITATTRIBUTES = b"".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n".encode() for s in LFS_SUFFIXES)


def git_hash(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class HubState:
    """Repos: {repo_id: {"private": bool, "branches": {name: sha}, "commits": {sha: commit}}};
    a commit is {"parent", "message", "date", "files": {path: {"sha256", "size", "lfs"}}}."""

    def __init__(self, root: Path, tokens: dict[str, str]):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.tokens = dict(tokens)           # token -> user name
        self.repos: dict[str, dict] = {}
        self.lock = threading.RLock()
        # path in repo -> actions the next GETs of it meet, one each: ("cut", n) sends n bytes then drops the
        # connection; ("status", code) answers that HTTP error
        self.faults: dict[str, list[tuple[str, int]]] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)

    # -- storage
    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha)
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return sha

    def read_blob(self, sha256: str) -> bytes:
        return self.blob_path(sha256).read_bytes()

    # -- repos
    def create_repo(self, repo_id: str, private: bool) -> None:
        with self.lock:
            if repo_id in self.repos:
                raise HubError(409, None, "You already created this model repo")
            self.repos[repo_id] = {"private": private, "branches": {}, "commits": {}, "created": _now()}
            self.commit(repo_id, "main", "initial commit", [("file", ".gitattributes", GITATTRIBUTES)], create=True)

    def repo(self, repo_id: str, user: str | None, write: bool = False) -> dict:
        repo = self.repos.get(repo_id)
        if repo is None or (repo["private"] and user is None):
            # the Hub answers 401 to anonymous callers for private and missing repos alike
            raise HubError(401 if user is None else 404, "RepoNotFound", "Repository not found")
        if repo.get("gated") and user is None:
            raise HubError(401, "GatedRepo", "Access to this model is restricted: log in and accept its conditions")
        if write and user is None:
            raise HubError(401, None, "You must be authenticated to write")
        return repo

    def head(self, repo: dict, revision: str) -> str:
        if revision in repo["branches"]:
            return repo["branches"][revision]
        if re.fullmatch(r"[0-9a-f]{40}", revision) and revision in repo["commits"]:
            return revision
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def files(self, repo: dict, revision: str) -> tuple[str, dict]:
        sha = self.head(repo, revision)
        return sha, repo["commits"][sha]["files"]

    def commit(self, repo_id: str, branch: str, message: str, ops: list, parent: str | None = None,
               create: bool = False) -> str:
        with self.lock:
            repo = self.repos[repo_id]
            head = repo["branches"].get(branch)
            if head is None and not create:
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {branch}")
            if parent is not None and parent != head:
                raise HubError(412, None, "A commit has happened since. Please refresh and try again.")
            files = dict(repo["commits"][head]["files"]) if head else {}
            for kind, path, payload in ops:
                if kind == "file":
                    files[path] = {"sha256": self.put_blob(payload), "size": len(payload), "lfs": False}
                elif kind == "lfsFile":
                    if not self.blob_path(payload["oid"]).exists():
                        raise HubError(422, None, f"LFS object {payload['oid']} for {path} was never uploaded")
                    size = self.blob_path(payload["oid"]).stat().st_size
                    files[path] = {"sha256": payload["oid"], "size": size, "lfs": True}
                elif kind == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {path}")
                elif kind == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for p in [p for p in files if p.startswith(prefix)]:
                        del files[p]
            body = json.dumps({"parent": head, "message": message, "files": files, "t": time.time_ns()},
                              sort_keys=True)
            sha = hashlib.sha1(body.encode()).hexdigest()
            repo["commits"][sha] = {"parent": head, "message": message, "date": _now(), "files": files}
            repo["branches"][branch] = sha
            return sha

    def entry(self, path: str, meta: dict, with_commit: dict | None = None) -> dict:
        if meta["lfs"]:
            pointer = lfs_pointer(meta["sha256"], meta["size"])
            item = {"type": "file", "oid": git_hash(pointer), "size": meta["size"], "path": path,
                    "lfs": {"oid": meta["sha256"], "size": meta["size"], "pointerSize": len(pointer)}}
        else:
            item = {"type": "file", "oid": git_hash(self.read_blob(meta["sha256"])), "size": meta["size"],
                    "path": path}
        if with_commit is not None:
            item["lastCommit"] = with_commit
        return item


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def _card_data(state: HubState, files: dict):
    meta = files.get("README.md")
    if not meta:
        return None
    text = state.read_blob(meta["sha256"]).decode("utf-8", "replace")
    m = re.match(r"\s*---\n(.*?)\n---", text, flags=re.S)
    try:
        return yaml.safe_load(m.group(1)) if m else None
    except yaml.YAMLError:
        return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "HubServer"

    def log_message(self, *args):  # quiet
        pass

    # -- plumbing
    @property
    def state(self) -> HubState:
        return self.server.state

    def user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return None
        token = auth[len("Bearer "):].strip()
        if token not in self.state.tokens:
            raise HubError(401, None, "Invalid credentials in Authorization header")
        return self.state.tokens[token]

    def body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            return self.rfile.read(length)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return b""

    def send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None,
             head: bool = False):
        data = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else b"")
        self.send_response(status)
        if raw is None:
            self.send_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def fail(self, exc: HubError, head: bool = False):
        headers = {"X-Error-Message": exc.message}
        if exc.code:
            headers["X-Error-Code"] = exc.code
        self.send(exc.status, {"error": exc.message}, headers=headers, head=head)

    def dispatch(self, method: str):
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.state.requests.append((method, unquote(url.path), self.headers.get("Range")))
        try:
            self.route(method, parts, query)
        except HubError as exc:
            self.fail(exc, head=method == "HEAD")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self):
        self.dispatch("GET")

    def do_HEAD(self):
        self.dispatch("HEAD")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    # -- routes
    def route(self, method: str, parts: list[str], query: dict):
        st = self.state
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self.create_repo()
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return self.validate_yaml()
        if method == "PUT" and len(parts) == 2 and parts[0] == "lfs-upload":
            return self.lfs_upload(parts[1])
        if method == "POST" and len(parts) == 2 and parts[0] == "lfs-verify":
            data = json.loads(self.body() or b"{}")
            if not st.blob_path(parts[1]).exists():
                raise HubError(404, None, f"LFS object {parts[1]} not found")
            return self.send(200, {"oid": data.get("oid"), "size": data.get("size")})
        if len(parts) >= 4 and parts[0] == "api" and parts[1] == "models":
            repo_id = f"{parts[2]}/{parts[3]}"
            rest = parts[4:]
            if method == "GET" and not rest:
                return self.repo_info(repo_id, "main")
            if method == "GET" and rest[0] == "revision" and len(rest) == 2:
                return self.repo_info(repo_id, rest[1])
            if method == "GET" and rest[0] == "tree" and len(rest) >= 2:
                return self.tree(repo_id, rest[1], "/".join(rest[2:]), query)
            if method == "POST" and rest[0] == "paths-info" and len(rest) == 2:
                return self.paths_info(repo_id, rest[1])
            if method == "POST" and rest[0] == "preupload" and len(rest) == 2:
                return self.preupload(repo_id, rest[1])
            if method == "POST" and rest[0] == "commit" and len(rest) == 2:
                return self.commit(repo_id, rest[1])
            if method == "POST" and rest[0] == "branch" and len(rest) >= 2:
                return self.create_branch(repo_id, "/".join(rest[1:]))
        if method == "POST" and len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs",
                                                                                                "objects", "batch"]:
            return self.lfs_batch(f"{parts[0]}/{parts[1][:-4]}")
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return self.resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), head=method == "HEAD")
        raise HubError(404, None, f"no route for {method} {self.path}")

    def create_repo(self):
        user = self.user()
        if user is None:
            raise HubError(401, None, "You must be authenticated to create a repo")
        data = json.loads(self.body())
        repo_id = f"{data.get('organization') or user}/{data['name']}"
        private = data.get("visibility") == "private" or bool(data.get("private"))
        url = f"{self.server.url}/{repo_id}"
        try:
            self.state.create_repo(repo_id, private)
        except HubError:
            return self.send(409, {"error": "You already created this model repo", "url": url})
        self.send(200, {"url": url, "name": repo_id, "id": repo_id})

    def validate_yaml(self):
        data = json.loads(self.body())
        m = re.match(r"\s*---\n(.*?)\n---", data.get("content", ""), flags=re.S)
        try:
            meta = yaml.safe_load(m.group(1)) if m else {}
        except yaml.YAMLError as exc:
            return self.send(400, {"errors": [{"message": f"invalid YAML: {exc}"}], "warnings": []})
        if meta is not None and not isinstance(meta, dict):
            return self.send(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
        self.send(200, {"errors": [], "warnings": []})

    def repo_info(self, repo_id: str, revision: str):
        repo = self.state.repo(repo_id, self.user())
        sha, files = self.state.files(repo, revision)
        siblings = []
        for path, meta in sorted(files.items()):
            item = {"rfilename": path, "size": meta["size"]}
            entry = self.state.entry(path, meta)
            item["blobId"] = entry["oid"]
            if "lfs" in entry:
                item["lfs"] = {"sha256": meta["sha256"], "size": meta["size"],
                               "pointerSize": entry["lfs"]["pointerSize"]}
            siblings.append(item)
        card = _card_data(self.state, files)
        self.send(200, {"_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id,
                        "author": repo_id.split("/")[0], "sha": sha, "private": repo["private"], "gated": False,
                        "disabled": False, "downloads": 0, "likes": 0, "tags": (card or {}).get("tags", []),
                        "library_name": (card or {}).get("library_name"), "cardData": card,
                        "siblings": siblings, "createdAt": repo["created"],
                        "lastModified": repo["commits"][sha]["date"]})

    def tree(self, repo_id: str, revision: str, path: str, query: dict):
        repo = self.state.repo(repo_id, self.user())
        sha, files = self.state.files(repo, revision)
        recursive = query.get("recursive", "False").lower() == "true"
        expand = query.get("expand", "False").lower() == "true"
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in files):
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {revision}")
        last = {"id": sha, "title": repo["commits"][sha]["message"], "date": repo["commits"][sha]["date"]} \
            if expand else None
        out, dirs = [], set()
        for p, meta in sorted(files.items()):
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix):].split("/")
            for depth in range(1, len(rel)):
                d = prefix + "/".join(rel[:depth])
                if (recursive or depth == 1) and d not in dirs:
                    dirs.add(d)
                    out.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0,
                                "path": d})
            if recursive or len(rel) == 1:
                out.append(self.state.entry(p, meta, last))
        self.send(200, out)

    def paths_info(self, repo_id: str, revision: str):
        repo = self.state.repo(repo_id, self.user())
        _, files = self.state.files(repo, revision)
        raw = self.body().decode()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(raw).get("paths", [])
        else:
            paths = parse_qs(raw).get("paths", [])
        out = []
        for p in paths:
            p = p.strip("/")
            if p in files:
                out.append(self.state.entry(p, files[p]))
            elif any(f.startswith(p + "/") for f in files):
                out.append({"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p})
        self.send(200, out)

    def preupload(self, repo_id: str, revision: str):
        repo = self.state.repo(repo_id, self.user(), write=True)
        _, files = self.state.files(repo, revision)
        out = []
        for f in json.loads(self.body())["files"]:
            sample = base64.b64decode(f.get("sample", ""))
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > 10 * 1024 * 1024 or b"\0" in sample
            existing = files.get(f["path"])
            oid = None
            if existing is not None:
                oid = existing["sha256"] if existing["lfs"] else git_hash(self.state.read_blob(existing["sha256"]))
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": oid})
        self.send(200, {"files": out, "commitOid": self.state.head(repo, revision)})

    def lfs_batch(self, repo_id: str):
        self.state.repo(repo_id, self.user(), write=True)
        data = json.loads(self.body())
        objects = []
        for obj in data.get("objects", []):
            item = {"oid": obj["oid"], "size": obj["size"]}
            if not self.state.blob_path(obj["oid"]).exists():
                item["actions"] = {"upload": {"href": f"{self.server.url}/lfs-upload/{obj['oid']}"},
                                   "verify": {"href": f"{self.server.url}/lfs-verify/{obj['oid']}"}}
            objects.append(item)
        self.send(200, {"transfer": "basic", "objects": objects})

    def lfs_upload(self, oid: str):
        data = self.body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, None, f"uploaded content does not match sha256 {oid}")
        self.state.put_blob(data)
        self.send(200, {})

    def commit(self, repo_id: str, revision: str):
        user = self.user()
        self.state.repo(repo_id, user, write=True)
        header, ops = {}, []
        for line in self.body().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                ops.append(("file", value["path"], base64.b64decode(value["content"])))
            elif key == "lfsFile":
                ops.append(("lfsFile", value["path"], value))
            elif key in ("deletedFile", "deletedFolder"):
                ops.append((key, value["path"], None))
            else:
                raise HubError(400, None, f"unknown commit operation {key!r}")
        sha = self.state.commit(repo_id, revision, header.get("summary", ""), ops, parent=header.get("parentCommit"))
        self.send(200, {"success": True, "commitOid": sha, "commitUrl": f"{self.server.url}/{repo_id}/commit/{sha}",
                        "pullRequestUrl": None})

    def create_branch(self, repo_id: str, branch: str):
        repo = self.state.repo(repo_id, self.user(), write=True)
        data = json.loads(self.body() or b"{}")
        with self.state.lock:
            if branch in repo["branches"]:
                raise HubError(409, None, f"branch {branch} already exists")
            repo["branches"][branch] = self.state.head(repo, data.get("startingPoint") or "main")
        self.send(200, {})

    def resolve(self, repo_id: str, revision: str, path: str, head: bool):
        repo = self.state.repo(repo_id, self.user())
        sha, files = self.state.files(repo, revision)
        meta = files.get(path)
        if meta is None:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {revision}")
        entry = self.state.entry(path, meta)
        etag = meta["sha256"] if meta["lfs"] else entry["oid"]
        data = self.state.read_blob(meta["sha256"])
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if meta["lfs"]:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(meta["size"])})
        status, start = 200, 0
        rng = self.headers.get("Range")
        if rng and not head:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m:
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else len(data) - 1
                if start >= len(data):
                    raise HubError(416, None, "range not satisfiable")
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data, status = data[start:end + 1], 206
        headers["Content-Length"] = str(len(data))
        fault = self.state.faults.get(path)
        if fault and not head:
            kind, value = fault.pop(0)
            if kind == "status":
                raise HubError(value, None, "injected failure")
            self.send_response(status)
            for key, val in headers.items():
                self.send_header(key, val)
            self.end_headers()
            self.wfile.write(data[:value])
            self.wfile.flush()
            self.close_connection = True
            return
        self.send(status, raw=data, headers=headers, head=head)


class HubServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root: Path, tokens: dict[str, str], host: str = "127.0.0.1", port: int = 0):
        self.state = HubState(root, tokens)
        super().__init__((host, port), Handler)
        self.url = f"http://{host}:{self.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
