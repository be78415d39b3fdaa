"""core.storage on local paths and fsspec's memory://, and core.node_cache (digests, tar safety, the
once-per-digest fill, eviction). S3 against a real server is in tests/integration/test_storage_s3.py."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import threading
import uuid

import pytest

from core.node_cache import NodeCache, pack_tree, tree_digest, unpack_tree
from core.storage import MARKER_NAME, Storage, StorageError


def _tree(root, files: dict[str, bytes]):
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


FILES = {"config.json": b'{"a": 1}', "weights/model.safetensors": os.urandom(4096), "weights/sub/x.txt": b"x"}


# ---- Storage: paths --------------------------------------------------------------------------------
def test_relative_path_is_made_absolute_in_the_building_process_and_pickles(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Storage("runs/r1")
    assert s.uri == str(tmp_path / "runs" / "r1") and s.is_local and s.local_path == tmp_path / "runs" / "r1"
    monkeypatch.chdir("/")
    back = pickle.loads(pickle.dumps(s))
    assert back == s and back.uri == str(tmp_path / "runs" / "r1")  # not re-resolved against the new cwd


def test_uri_forms():
    assert Storage("file:///tmp/a/b").uri == "/tmp/a/b"
    assert Storage("s3://bkt/prefix/").uri == "s3://bkt/prefix"
    assert not Storage("s3://bkt/p").is_local and Storage("s3://bkt/p").local_path is None
    assert Storage("s3://bkt/p").join("a", "b/c.txt").uri == "s3://bkt/p/a/b/c.txt"
    assert (Storage("s3://bkt") / "x").uri == "s3://bkt/x"
    with pytest.raises(ValueError, match="leaves"):
        Storage("s3://bkt/p").join("../other")
    with pytest.raises(StorageError):
        Storage("")


# ---- Storage: operations, on a local folder and on an fsspec-only scheme -----------------------------
@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        yield Storage(str(tmp_path / "store"))
        return
    s = Storage(f"memory://saei-test-{uuid.uuid4().hex[:8]}/run")  # pyarrow lacks memory://: the fsspec path
    yield s
    s.delete()


def test_bytes_text_exists_list_delete(store):
    assert not store.exists() and store.list() == [] and store.list_files() == []
    store.write_bytes("a/b.bin", b"\x00\x01")
    store.write_text("a/c.txt", "héllo")
    store.write_text("top.txt", "1")
    assert store.read_bytes("a/b.bin") == b"\x00\x01" and store.read_text("a/c.txt") == "héllo"
    assert store.exists("a") and store.exists("a/b.bin") and not store.exists("a/zz")
    assert store.list() == ["a", "top.txt"] and store.list("a") == ["b.bin", "c.txt"]
    assert store.list_files() == ["a/b.bin", "a/c.txt", "top.txt"]
    store.write_text("top.txt", "2")  # overwrite
    assert store.join("top.txt").read_text() == "2"
    with pytest.raises(FileNotFoundError):
        store.read_bytes("a/missing")
    store.delete("a")
    assert store.list() == ["top.txt"]
    store.delete("top.txt")
    store.delete("never-there")
    assert store.list() == []


def test_upload_then_download_a_folder(store, tmp_path):
    src = _tree(tmp_path / "src", FILES)
    store.upload(src, "policy")
    assert store.list_files("policy") == sorted(FILES)
    out = store.download(tmp_path / "out", "policy")
    assert tree_digest(out) == tree_digest(src)
    with pytest.raises(FileNotFoundError):
        store.download(tmp_path / "out2", "no-such-folder")


def test_local_write_is_a_rename_and_leaves_no_temp_files(tmp_path):
    s = Storage(str(tmp_path))
    s.write_bytes("f.bin", b"old")
    inode = os.stat(tmp_path / "f.bin").st_ino
    s.write_bytes("f.bin", b"new")
    assert (tmp_path / "f.bin").read_bytes() == b"new"
    assert os.stat(tmp_path / "f.bin").st_ino != inode  # a new file renamed over the old, not rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


# ---- errors and the marker ---------------------------------------------------------------------------
def test_unknown_scheme_names_the_uri_and_the_fix():
    with pytest.raises(StorageError) as e:
        Storage("nosuchscheme://bucket/run").check_writable()
    assert "nosuchscheme://bucket/run" in str(e.value) and "s3://" in str(e.value)


def test_check_writable_passes_and_leaves_nothing(tmp_path):
    s = Storage(str(tmp_path / "new" / "run"))
    s.check_writable()
    assert s.list() == []


def test_check_writable_fails_with_the_uri_when_the_folder_cannot_exist(tmp_path):
    (tmp_path / "a_file").write_text("x")
    s = Storage(str(tmp_path / "a_file" / "run"))  # a folder under a regular file
    with pytest.raises(StorageError) as e:
        s.check_writable()
    assert s.uri in str(e.value)


def test_marker_seen_by_a_node_that_shares_the_path(tmp_path):
    driver = Storage(str(tmp_path / "run"))
    token = driver.write_marker()
    assert driver.read_text(MARKER_NAME) == token
    pickle.loads(pickle.dumps(driver)).check_visible(token)  # what a worker on the same disk does


def test_marker_missing_on_a_node_says_the_path_is_not_shared(tmp_path):
    driver_view = Storage(str(tmp_path / "head" / "run"))
    token = driver_view.write_marker()
    # The worker's disk: same path string, other content. Model it with another folder.
    worker_view = Storage(str(tmp_path / "worker" / "run"))
    with pytest.raises(StorageError) as e:
        worker_view.check_visible(token)
    msg = str(e.value)
    assert "not shared with this node" in msg and "s3://" in msg and worker_view.uri in msg and "no marker" in msg


def test_stale_marker_from_an_earlier_run_is_not_accepted(tmp_path):
    s = Storage(str(tmp_path / "run"))
    s.write_marker()  # an earlier run on this node's own disk
    with pytest.raises(StorageError, match="different marker"):
        s.check_visible("head:1:token-of-this-run")


# ---- tree digest and tar ----------------------------------------------------------------------------
def test_tree_digest_depends_on_paths_and_contents_only(tmp_path):
    a = _tree(tmp_path / "a", FILES)
    b = _tree(tmp_path / "b", dict(reversed(list(FILES.items()))))
    os.utime(b / "config.json", (1, 1))
    assert tree_digest(a) == tree_digest(b)
    (b / "config.json").write_bytes(b'{"a": 2}')
    assert tree_digest(a) != tree_digest(b)
    c = _tree(tmp_path / "c", {"config.json2": FILES["config.json"]} | {k: v for k, v in FILES.items() if k != "config.json"})
    assert tree_digest(a) != tree_digest(c)


def test_pack_unpack_round_trip_is_deterministic(tmp_path):
    src = _tree(tmp_path / "src", FILES)
    (src / "link.json").symlink_to(src / "config.json")  # followed: the content travels
    data = pack_tree(src)
    assert data == pack_tree(src)
    out = unpack_tree(data, tmp_path / "out")
    assert tree_digest(out) == tree_digest(src) and not (out / "link.json").is_symlink()


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _member(name, kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize("member, reason", [
    ((_member("/etc/evil"), b"x"), "absolute"),
    ((_member("../evil"), b"x"), "'..'"),
    ((_member("ok/../../evil"), b"x"), "'..'"),
    ((_member("ln", tarfile.SYMTYPE, "/etc/passwd"), None), "leaves"),
    ((_member("d/ln", tarfile.SYMTYPE, "../../outside"), None), "leaves"),
    ((_member("hl", tarfile.LNKTYPE, "../outside"), None), "leaves"),
    ((_member("dev", tarfile.CHRTYPE), None), "not a file"),
])
def test_unpack_refuses_members_that_leave_the_folder(tmp_path, member, reason):
    data = _tar((_member("fine.txt"), b"ok"), member)
    with pytest.raises(ValueError, match=reason):
        unpack_tree(data, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before anything is written
    assert not (tmp_path / "evil").exists() and not (tmp_path / "outside").exists()


def test_unpack_accepts_a_link_that_stays_inside(tmp_path):
    data = _tar((_member("d/target.txt"), b"t"), (_member("d/ln", tarfile.SYMTYPE, "target.txt"), None))
    out = unpack_tree(data, tmp_path / "out")
    assert (out / "d" / "ln").read_bytes() == b"t"


# ---- NodeCache ---------------------------------------------------------------------------------------
def test_fetch_tree_downloads_once_per_digest(tmp_path):
    src = _tree(tmp_path / "src", FILES)
    remote = Storage(str(tmp_path / "store")).join("policy")
    remote.upload(src)
    digest = tree_digest(src)
    cache = NodeCache(tmp_path / "cache")
    first = cache.fetch_tree(remote, digest, verify=True)
    assert tree_digest(first) == digest and cache.stats["fills"] == 1
    remote.delete()  # a second fetch must not touch storage
    assert cache.fetch_tree(remote.uri, digest) == first
    assert cache.stats == {"hits": 1, "fills": 1, "evicted": 0}
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_fetch_tree_verify_refuses_content_that_does_not_match_the_digest(tmp_path):
    remote = Storage(str(tmp_path / "store")).join("policy")
    remote.upload(_tree(tmp_path / "src", FILES))
    cache = NodeCache(tmp_path / "cache")
    with pytest.raises(StorageError, match="differs"):
        cache.fetch_tree(remote, "0" * 64, verify=True)
    assert cache.get("0" * 64) is None and list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_fetch_of_a_missing_folder_leaves_no_entry(tmp_path):
    cache = NodeCache(tmp_path / "cache")
    with pytest.raises(FileNotFoundError):
        cache.fetch_tree(Storage(str(tmp_path / "nothing")), "abc")
    assert cache.get("abc") is None


def test_put_bytes_unpacks_once_and_checks_the_digest(tmp_path):
    src = _tree(tmp_path / "src", FILES)
    cache = NodeCache(tmp_path / "cache")
    digest, data = tree_digest(src), pack_tree(src)
    path = cache.put_bytes(digest, data)
    assert cache.put_bytes(digest, b"not even a tar") == path  # a hit never looks at the bytes
    assert tree_digest(path) == digest and cache.stats["fills"] == 1
    with pytest.raises(StorageError, match="differs"):
        cache.put_bytes("f" * 64, data)


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", "x" * 200])
def test_digest_must_be_a_plain_name(tmp_path, bad):
    with pytest.raises(ValueError):
        NodeCache(tmp_path / "cache").path(bad)


def test_cache_root_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEI_CACHE_DIR", str(tmp_path / "envcache"))
    assert NodeCache().root == tmp_path / "envcache"


def _put(cache, tmp_path, name, size):
    return cache.put_bytes(name, pack_tree(_tree(tmp_path / f"src_{name}", {"f": bytes(size)})), verify=False)


def test_eviction_removes_the_least_recently_used(tmp_path):
    cache = NodeCache(tmp_path / "cache", max_bytes=2500)
    for i, name in enumerate(["d0", "d1"]):
        os.utime(_put(cache, tmp_path, name, 1000), (100 + i, 100 + i))  # d0 used before d1
    assert cache.get("d0") is not None  # ...and now d0 is the more recent one
    _put(cache, tmp_path, "d2", 1000)  # 3000 bytes > 2500: one entry must go
    assert cache.get("d1") is None and cache.get("d0") is not None and cache.get("d2") is not None
    assert cache.stats["evicted"] == 1 and cache.evict() == []


def test_eviction_spares_the_returned_entry_and_one_being_filled(tmp_path):
    cache = NodeCache(tmp_path / "cache", max_bytes=500)
    _put(cache, tmp_path, "small", 100)
    with cache._lock("small"):  # as if another process were filling or removing it
        big = _put(cache, tmp_path, "big", 1000)  # over budget on its own: still returned, still there
    assert big.is_dir() and cache.get("small") is not None
    assert cache.evict(keep="big") == ["small"] and big.is_dir()
    assert cache.evict() == ["big"]


def test_two_threads_fetching_one_digest_fill_it_once(tmp_path):
    # flock holds per open file, so two threads contend as two processes do (tests/integration has those).
    src = _tree(tmp_path / "src", {f"f{i}": os.urandom(100_000) for i in range(20)})
    remote = Storage(str(tmp_path / "store"))
    remote.upload(src)
    digest, barrier, caches, paths = tree_digest(src), threading.Barrier(2), [], []

    def run():
        cache = NodeCache(tmp_path / "cache")
        caches.append(cache)
        barrier.wait()
        paths.append(cache.fetch_tree(remote, digest, verify=True))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(paths) == 2 and paths[0] == paths[1] and tree_digest(paths[0]) == digest
    assert sorted(c.stats["fills"] for c in caches) == [0, 1] and sum(c.stats["hits"] for c in caches) == 1
