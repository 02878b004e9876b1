"""A small Hugging Face Hub-protocol server on loopback, for tests that exercise the real `huggingface_hub` client.

It implements the endpoints the client uses to create repos and branches, commit (regular files inline, large
files through the LFS batch API), list and download files, with files kept on disk. Auth is enforced the way the
Hub does it: every write needs a known token, reading a private repo needs one too. `fail_next(kind)` makes the
next request of a kind ("commit", "lfs_upload", ...) answer 500, to test interrupted pushes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".png", ".jpg", ".jpeg", ".npy")


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass(frozen=True)
class Entry:
    """One file in a commit: its content lives in the blob store under `sha256`."""

    size: int
    sha256: str
    git_oid: str
    lfs: bool

    def oid(self) -> str:
        # The preupload endpoint reports this oid; the client compares it with the local one to skip unchanged files.
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, Entry]] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)  # commit ids in creation order, the initial one included

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubState:
    def __init__(self, root: Path, tokens: dict[str, str]):
        self.root = root
        self.blobs = root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tokens = tokens  # token -> user name
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.authorizations: list[str | None] = []  # the Authorization header of every request (None: none sent)
        self.failures: dict[str, int] = {}
        self.lock = threading.RLock()
        self.url = ""

    def fail_next(self, kind: str, times: int = 1) -> None:
        with self.lock:
            self.failures[kind] = self.failures.get(kind, 0) + times

    def should_fail(self, kind: str) -> bool:
        with self.lock:
            if self.failures.get(kind, 0) > 0:
                self.failures[kind] -= 1
                return True
            return False

    def store_blob(self, content: bytes) -> str:
        digest = hashlib.sha256(content).hexdigest()
        path = self.blobs / digest
        if not path.exists():
            temporary = path.with_suffix(".tmp")
            temporary.write_bytes(content)
            temporary.replace(path)
        return digest

    def new_commit(self, repo: Repo, branch: str, files: dict[str, Entry], message: str) -> str:
        parent = repo.branches.get(branch, "")
        seed = json.dumps([parent, message, time.time_ns(), sorted((p, e.sha256) for p, e in files.items())])
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[sha] = files
        repo.branches[branch] = sha
        repo.history.append(sha)
        return sha


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState  # set on the subclass built by `serve`

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    # --- plumbing -------------------------------------------------------------------------------------------------

    def body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None, head=False):
        data = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def user(self) -> str | None:
        header = self.headers.get("Authorization", "")
        return self.state.tokens.get(header[len("Bearer ") :]) if header.startswith("Bearer ") else None

    def require_user(self) -> str:
        user = self.user()
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header: a write token is required")
        return user

    def repo(self, repo_id: str, write: bool = False) -> Repo:
        repo = self.state.repos.get(repo_id)
        if write:
            self.require_user()
        if repo is None or (repo.private and self.user() is None):
            # The Hub hides private repos from anonymous users behind the same answer as a missing repo.
            raise HubError(404 if repo is None else 401, "Repository not found", "RepoNotFound")
        return repo

    def commit_files(self, repo: Repo, revision: str) -> tuple[str, dict[str, Entry]]:
        sha = repo.resolve(revision)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha, repo.commits[sha]

    def handle_any(self, method: str) -> None:
        split = urlsplit(self.path)
        segments = [unquote(part) for part in split.path.split("/")[1:]]
        query = parse_qs(split.query)
        self.state.requests.append((method, unquote(split.path)))
        self.state.authorizations.append(self.headers.get("Authorization"))
        try:
            with self.state.lock:
                self.route(method, segments, query)
        except HubError as error:
            headers = {"X-Error-Code": error.code} if error.code else {}
            headers["X-Error-Message"] = error.message
            self.send(error.status, {"error": error.message}, headers=headers, head=method == "HEAD")
        except Exception as error:  # a bug in this server: answer, so the client reports it instead of hanging
            message = f"loopback hub bug: {type(error).__name__}: {error}"
            self.send(500, {"error": message}, headers={"X-Error-Message": message}, head=method == "HEAD")

    def do_GET(self):
        self.handle_any("GET")

    def do_HEAD(self):
        self.handle_any("HEAD")

    def do_POST(self):
        self.handle_any("POST")

    def do_PUT(self):
        self.handle_any("PUT")

    # --- routes ---------------------------------------------------------------------------------------------------

    def route(self, method: str, s: list[str], query: dict) -> None:
        if method == "POST" and s[:3] == ["api", "repos", "create"]:
            return self.create_repo()
        if method == "POST" and s[:2] == ["api", "validate-yaml"]:
            self.body()
            return self.send(200, {})
        if method == "PUT" and s[:1] == ["__lfs"]:
            return self.lfs_put(s[1])
        if method == "POST" and len(s) >= 6 and s[2:6] == ["info", "lfs", "objects", "batch"] and s[1].endswith(".git"):
            return self.lfs_batch(f"{s[0]}/{s[1][:-4]}")
        if s[:2] == ["api", "models"] and len(s) >= 4:
            repo_id, action, rest = f"{s[2]}/{s[3]}", (s[4] if len(s) > 4 else None), s[5:]
            if method == "GET" and action is None:
                return self.repo_info(repo_id, "main")
            if method == "GET" and action == "revision":
                return self.repo_info(repo_id, "/".join(rest))
            if method == "POST" and action == "preupload":
                return self.preupload(repo_id, "/".join(rest))
            if method == "POST" and action == "commit":
                return self.commit(repo_id, "/".join(rest))
            if method == "POST" and action == "branch":
                return self.create_branch(repo_id, "/".join(rest))
            if method == "GET" and action == "tree":
                return self.tree(repo_id, rest[0], "/".join(rest[1:]), query.get("recursive", ["false"])[0] == "true")
            if method == "POST" and action == "paths-info":
                return self.paths_info(repo_id, "/".join(rest))
        if method in ("GET", "HEAD") and len(s) >= 5 and s[2] == "resolve":
            return self.resolve(f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]), head=method == "HEAD")
        self.body()
        raise HubError(404, f"loopback hub: no route for {method} {self.path}")

    def create_repo(self) -> None:
        payload = json.loads(self.body())
        user = self.require_user()
        if payload.get("type", "model") != "model":
            raise HubError(400, "loopback hub only serves model repos")
        # A bare name lands in the token owner's namespace, as on the Hub.
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        url = f"{self.state.url}/{repo_id}"
        if repo_id in self.state.repos:
            # Like the Hub, the conflict answer still names the repo: `create_repo(exist_ok=True)` reads its url.
            return self.send(409, {"error": "You already created this model repo", "url": url})
        repo = Repo(private=payload.get("visibility", "public") == "private" or bool(payload.get("private")))
        attributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        entry = Entry(len(attributes), self.state.store_blob(attributes), git_blob_oid(attributes), lfs=False)
        self.state.new_commit(repo, "main", {".gitattributes": entry}, "initial commit")
        self.state.repos[repo_id] = repo
        self.send(200, {"url": url, "name": repo_id})

    def repo_info(self, repo_id: str, revision: str) -> None:
        repo = self.repo(repo_id)
        sha, files = self.commit_files(repo, revision)
        info = {
            "id": repo_id,
            "modelId": repo_id,
            "sha": sha,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [{"rfilename": path} for path in sorted(files)],
        }
        self.send(200, info)

    def preupload(self, repo_id: str, revision: str) -> None:
        payload = json.loads(self.body())
        repo = self.repo(repo_id, write=True)
        files = repo.commits[repo.resolve(revision)] if repo.resolve(revision) else {}
        answer = []
        for item in payload["files"]:
            sample = base64.b64decode(item["sample"])
            lfs = item["path"].endswith(LFS_SUFFIXES) or b"\0" in sample or item["size"] > 10_000_000
            existing = files.get(item["path"])
            answer.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": existing.oid() if existing is not None else None,
                }
            )
        self.send(200, {"files": answer, "commitOid": repo.resolve(revision)})

    def lfs_batch(self, repo_id: str) -> None:
        payload = json.loads(self.body())
        self.repo(repo_id, write=True)
        objects = []
        for item in payload["objects"]:
            answer = {"oid": item["oid"], "size": item["size"]}
            if not (self.state.blobs / item["oid"]).exists():  # already stored objects need no upload
                answer["actions"] = {"upload": {"href": f"{self.state.url}/__lfs/{item['oid']}"}}
            objects.append(answer)
        self.send(200, {"transfer": "basic", "objects": objects})

    def lfs_put(self, oid: str) -> None:
        content = self.body()
        if self.state.should_fail("lfs_upload"):
            raise HubError(500, "Internal Error - storage backend unavailable (injected)")
        if hashlib.sha256(content).hexdigest() != oid:
            raise HubError(400, f"uploaded content does not match oid {oid}")
        self.state.store_blob(content)
        self.send(200, raw=b"")

    def commit(self, repo_id: str, revision: str) -> None:
        lines = [json.loads(line) for line in self.body().splitlines() if line.strip()]
        repo = self.repo(repo_id, write=True)
        if self.state.should_fail("commit"):
            raise HubError(500, "Internal Error - the commit could not be created (injected)")
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files = dict(repo.commits[repo.branches[revision]])
        header = {}
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                header = value
                parent = value.get("parentCommit")
                if parent and parent != repo.branches[revision]:
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            elif key == "file":
                content = base64.b64decode(value["content"])
                files[value["path"]] = Entry(len(content), self.state.store_blob(content), git_blob_oid(content), False)
            elif key == "lfsFile":
                blob = self.state.blobs / value["oid"]
                if not blob.exists():
                    raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{value['oid']}\nsize {value['size']}\n"
                files[value["path"]] = Entry(value["size"], value["oid"], git_blob_oid(pointer.encode()), True)
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: entry for path, entry in files.items() if not path.startswith(prefix)}
            else:
                raise HubError(400, f"unsupported commit operation {key!r}")
        sha = self.state.new_commit(repo, revision, files, header.get("summary", ""))
        self.send(200, {"commitUrl": f"{self.state.url}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True})

    def create_branch(self, repo_id: str, branch: str) -> None:
        raw = self.body()
        payload = json.loads(raw) if raw else {}
        repo = self.repo(repo_id, write=True)
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = repo.resolve(payload.get("startingPoint") or "main")
        if start is None:
            raise HubError(404, f"Invalid rev id: {payload.get('startingPoint')}", "RevisionNotFound")
        repo.branches[branch] = start
        self.send(200, {})

    def entry_json(self, path: str, entry: Entry) -> dict:
        item = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": path}
        if entry.lfs:
            item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": 134}
        return item

    def tree(self, repo_id: str, revision: str, folder: str, recursive: bool) -> None:
        _, files = self.commit_files(self.repo(repo_id), revision)
        prefix = folder.rstrip("/") + "/" if folder else ""
        listing, folders = [], set()
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            relative = path[len(prefix) :]
            if "/" in relative and not recursive:
                folders.add(prefix + relative.split("/")[0])
                continue
            if "/" in relative:
                parts = relative.split("/")[:-1]
                folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            listing.append(self.entry_json(path, files[path]))
        if folder and not listing and not folders:
            raise HubError(404, f"{folder} does not exist at {revision}", "EntryNotFound")
        listing += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": name} for name in sorted(folders)]
        self.send(200, listing)

    def paths_info(self, repo_id: str, revision: str) -> None:
        raw = self.body().decode()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(raw).get("paths", [])
        else:
            paths = parse_qs(raw).get("paths", [])
        _, files = self.commit_files(self.repo(repo_id), revision)
        self.send(200, [self.entry_json(path, files[path]) for path in paths if path in files])

    def resolve(self, repo_id: str, revision: str, path: str, head: bool) -> None:
        sha, files = self.commit_files(self.repo(repo_id), revision)
        entry = files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry.oid()}"'}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        content = (self.state.blobs / entry.sha256).read_bytes()
        self.send(200, headers=headers, raw=content, head=head)


@dataclass
class HubServer:
    state: HubState
    server: ThreadingHTTPServer
    thread: threading.Thread

    @property
    def url(self) -> str:
        return self.state.url

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve(root: Path, tokens: dict[str, str]) -> HubServer:
    """Starts the server on a free loopback port in a daemon thread."""
    state = HubState(Path(root), tokens)
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="loopback-hub", daemon=True)
    thread.start()
    return HubServer(state, server, thread)


def main() -> None:
    """`python tests/hub_server.py ROOT TOKEN`: serve until killed (prints the URL), for manual checks."""
    import sys

    hub = serve(Path(sys.argv[1]), {sys.argv[2]: "tester"} if len(sys.argv) > 2 else {})
    print(hub.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        hub.close()


if __name__ == "__main__":
    main()
