"""The artifact root: a local folder, a folder on a shared filesystem, or an object-store URI (`s3://bucket/prefix`).

Every stage folder, manifest, checkpoint and report lives under the root. On a cluster the nodes have their own
disks, so a stage never reads another stage's output from its own disk: it downloads its inputs from the root into
a per-node cache (`NodeCache`, keyed by the input's cache key and checked against the manifest's sha256s) and
publishes its outputs to the root with the manifest written last (`pipeline.cache`).

`Storage` is small on purpose: read/write/list/delete of files and folders by paths relative to the root. A local
root does it with the filesystem (renames are atomic); `s3://` with boto3, whose client reads its endpoint and
credentials from the usual environment variables (`AWS_ENDPOINT_URL` for an S3-compatible store,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, profiles or an instance role). Google Cloud
Storage works through its S3-compatible endpoint (`AWS_ENDPOINT_URL=https://storage.googleapis.com` with HMAC
keys). A `Storage` pickles as its URI: each process builds its own client from its own environment.

Cluster nodes do not share the driver's environment: `carried_env()` collects the driver's storage variables and
the pipeline passes them to every Ray worker (runtime environment) as `NARVL_CARRY_<NAME>`; `adopt_carried_env()`
(called first thing in every worker) sets each one unless the node has its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")
CARRY_PREFIX = "NARVL_CARRY_"
CHUNK = 1 << 20


class StorageError(RuntimeError):
    """The root cannot be read or written; the message names the root (and the node, where known)."""


def carried_env() -> dict[str, str]:
    """The driver's storage variables, renamed so that a node's own settings win (see adopt_carried_env)."""
    return {CARRY_PREFIX + k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k)}


def adopt_carried_env() -> None:
    """In a worker: take each carried variable the node does not set itself."""
    for k, v in list(os.environ.items()):
        if k.startswith(CARRY_PREFIX) and not os.environ.get(k[len(CARRY_PREFIX):]):  # empty counts as unset
            os.environ[k[len(CARRY_PREFIX):]] = v


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def is_remote(uri: str | Path) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


class Storage:
    """Files under one root, addressed by '/'-separated paths relative to it."""

    def __init__(self, uri: str | Path) -> None:
        uri = str(uri)
        if uri.startswith("file://"):
            uri = uri[len("file://"):]
        self.remote = is_remote(uri)
        if self.remote:
            scheme, _, rest = uri.partition("://")
            if scheme != "s3":
                raise StorageError(f"artifact root {uri}: only local paths and s3:// URIs are supported (for Google "
                                   "Cloud Storage use s3:// with AWS_ENDPOINT_URL=https://storage.googleapis.com)")
            bucket, _, prefix = rest.partition("/")
            if not bucket:
                raise StorageError(f"artifact root {uri}: expected s3://BUCKET[/PREFIX]")
            self.bucket, self.prefix = bucket, prefix.strip("/")
            self.uri = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
            self._client: Any = None
        else:
            self.path = Path(uri).expanduser().resolve()
            self.uri = str(self.path)

    def __reduce__(self):  # pickles as its URI: a worker builds its own client from its own environment
        return (Storage, (self.uri,))

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    # ---- addressing ------------------------------------------------------------------------------------------
    def local(self, rel: str = "") -> Path:
        """The local path of `rel` (local roots only)."""
        assert not self.remote, "local() on an object-store root"
        return self.path / rel if rel else self.path

    def _key(self, rel: str) -> str:
        rel = rel.strip("/")
        return f"{self.prefix}/{rel}" if self.prefix and rel else (self.prefix or rel)

    def uri_of(self, rel: str) -> str:
        return f"{self.uri}/{rel.strip('/')}" if rel else self.uri

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            # bounded retries: an unreachable store fails in seconds, not minutes
            self._client = boto3.client("s3", config=Config(retries={"max_attempts": 3, "mode": "standard"},
                                                            connect_timeout=5, read_timeout=60))
        return self._client

    # ---- files -----------------------------------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        if not self.remote:
            try:
                return self.local(rel).read_bytes()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return None
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None
        except Exception as e:  # noqa: BLE001 - boto3 raises ClientError subclasses built at run time
            if _code(e) in ("404", "NoSuchKey"):
                return None
            raise StorageError(f"reading {self.uri_of(rel)}: {e}") from e

    def read_json(self, rel: str) -> Any | None:
        data = self.read_bytes(rel)
        if data is None:
            return None
        try:
            return json.loads(data)
        except json.JSONDecodeError:
            return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write one file whole (atomically: a reader sees the old file, nothing, or the new file)."""
        if not self.remote:
            path = self.local(rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            return
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"writing {self.uri_of(rel)}: {e}") from e

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create the file only if it does not exist (atomic: of two writers exactly one wins); True if created."""
        if not self.remote:  # written whole first, then linked into place: a reader never sees it half-written
            path = self.local(rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
            tmp.write_bytes(data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                tmp.unlink(missing_ok=True)
            return True
        try:  # S3 conditional write: 412 when the key exists
            self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data, IfNoneMatch="*")
            return True
        except Exception as e:  # noqa: BLE001
            if _code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise StorageError(f"writing {self.uri_of(rel)}: {e}") from e

    def delete_file(self, rel: str) -> None:
        if not self.remote:
            self.local(rel).unlink(missing_ok=True)
            return
        self.client.delete_object(Bucket=self.bucket, Key=self._key(rel))

    def write_json(self, rel: str, data: Any) -> None:
        self.write_bytes(rel, json.dumps(data, indent=2, sort_keys=True).encode())

    def upload_file(self, local: Path, rel: str) -> None:
        if not self.remote:
            dest = self.local(rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, dest)
            return
        try:
            self.client.upload_file(str(local), self.bucket, self._key(rel))
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"uploading {local} to {self.uri_of(rel)}: {e}") from e

    def download_file(self, rel: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        if not self.remote:
            shutil.copyfile(self.local(rel), local)
            return
        try:
            self.client.download_file(self.bucket, self._key(rel), str(local))
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"downloading {self.uri_of(rel)}: {e}") from e

    def exists(self, rel: str) -> bool:
        if not self.remote:
            return self.local(rel).exists()
        return any(True for _ in self.list_files(rel, limit=1)) or self.read_bytes(rel) is not None

    def list_files(self, rel: str, limit: int | None = None) -> Iterator[str]:
        """Every file below `rel` (recursively), as paths relative to `rel`."""
        if not self.remote:
            base = self.local(rel)
            if not base.is_dir():
                return
            n = 0
            for p in sorted(base.rglob("*")):
                if p.is_file():
                    yield p.relative_to(base).as_posix()
                    n += 1
                    if limit and n >= limit:
                        return
            return
        prefix = self._key(rel).rstrip("/") + "/"
        paginator = self.client.get_paginator("list_objects_v2")
        n = 0
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    yield obj["Key"][len(prefix):]
                    n += 1
                    if limit and n >= limit:
                        return
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"listing {self.uri_of(rel)}: {e}") from e

    def tree_stats(self, rel: str) -> tuple[int, int, float | None]:
        """(files, bytes, newest modification time) of everything below `rel`; (0, 0, None) when empty or absent."""
        n = size = 0
        newest: float | None = None
        if not self.remote:
            base = self.local(rel)
            if not base.is_dir():
                return 0, 0, None
            for folder, _, files in os.walk(base):  # every folder once; symlinks are not followed
                for path, is_file in [(folder, False), *((os.path.join(folder, f), True) for f in files)]:
                    try:
                        st = os.lstat(path)
                    except FileNotFoundError:  # removed meanwhile
                        continue
                    newest = st.st_mtime if newest is None else max(newest, st.st_mtime)
                    if is_file:
                        n, size = n + 1, size + st.st_size
            return n, size, newest
        prefix = self._key(rel).rstrip("/") + "/"
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    n, size = n + 1, size + int(obj["Size"])
                    t = obj["LastModified"].timestamp()
                    newest = t if newest is None else max(newest, t)
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"listing {self.uri_of(rel)}: {e}") from e
        return n, size, newest

    def list_dirs(self, rel: str) -> list[str]:
        """The names of the folders directly below `rel`."""
        if not self.remote:
            base = self.local(rel)
            return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        prefix = self._key(rel).rstrip("/") + "/" if rel or self.prefix else ""
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix,
                                                                         Delimiter="/"):
            out += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(out)

    def delete_dir(self, rel: str) -> None:
        if not self.remote:
            shutil.rmtree(self.local(rel), ignore_errors=True)
            return
        keys = [self._key(f"{rel}/{f}") for f in self.list_files(rel)]
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=self.bucket,
                                       Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})

    # ---- folders ---------------------------------------------------------------------------------------------
    def upload_dir(self, local: Path, rel: str, skip: tuple[str, ...] = ()) -> None:
        for p in sorted(Path(local).rglob("*")):
            name = p.relative_to(local).as_posix()
            if p.is_file() and name not in skip:
                self.upload_file(p, f"{rel}/{name}")

    def download_dir(self, rel: str, local: Path) -> list[str]:
        names = list(self.list_files(rel))
        for name in names:
            self.download_file(f"{rel}/{name}", Path(local) / name)
        return names

    def check_writable(self) -> None:
        """Write, read back and delete a probe file; StorageError naming the root if any step fails."""
        rel = f".probe/{uuid.uuid4().hex}"
        token = uuid.uuid4().hex.encode()
        try:
            if not self.remote:
                if self.path.exists() and not self.path.is_dir():
                    raise StorageError(f"artifact root {self.uri} is a file, not a folder")
            self.write_bytes(rel, token)
            if self.read_bytes(rel) != token:
                raise StorageError(f"artifact root {self.uri}: a file written there reads back differently")
        except StorageError:
            raise
        except OSError as e:
            raise StorageError(f"artifact root {self.uri} is not writable: {e}") from e
        finally:
            try:
                if self.remote:
                    self.client.delete_object(Bucket=self.bucket, Key=self._key(rel))
                else:
                    self.local(rel).unlink(missing_ok=True)
            except Exception:  # noqa: BLE001 - best effort
                pass


def _code(e: Exception) -> str:
    resp = getattr(e, "response", None)
    return str(resp.get("Error", {}).get("Code", "")) if isinstance(resp, dict) else ""


class NodeCache:
    """Stage inputs downloaded from an object-store root, once per node, keyed by the input's cache key.

    `<cache_dir>/<key>/` holds the stage folder; a `.complete` marker is written after every file was downloaded and
    verified against the sha256s in its manifest, so a download cut short is done again, never used.
    """

    def __init__(self, cache_dir: Path | None = None) -> None:
        base = cache_dir or os.environ.get("NARVL_NODE_CACHE") or Path(tempfile.gettempdir()) / "narvl-node-cache"
        # one cache per Ray node, also where several nodes share a disk (a test cluster on one machine)
        self.dir = Path(base) / _ray_node_id() if cache_dir is None else Path(base)

    def fetch(self, storage: Storage, rel: str, key: str) -> Path:
        """The local copy of the stage folder `rel` (whose manifest carries `key`), verified."""
        dest = self.dir / key
        if (dest / ".complete").exists():
            return dest
        tmp = self.dir / f".{key}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            storage.download_dir(rel, tmp)
            verify_files(tmp, storage.uri_of(rel))
            (tmp / ".complete").write_text("")
            try:
                os.rename(tmp, dest)
            except OSError:  # another process on this node finished the same download first
                if not (dest / ".complete").exists():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return dest


def _ray_node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()[:12]
    except Exception:  # noqa: BLE001 - outside Ray: one cache for this machine
        pass
    return "local"


def verify_files(folder: Path, where: str) -> None:
    """Check every file the manifest lists against its sha256; StorageError naming the first that differs."""
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    for name, digest in (manifest.get("files") or {}).items():
        path = Path(folder) / name
        if not path.is_file():
            raise StorageError(f"{where}/{name}: listed in the manifest but missing")
        if sha256_file(path) != digest:
            raise StorageError(f"{where}/{name}: sha256 differs from the manifest (changed or corrupted)")
