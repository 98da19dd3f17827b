"""The cache the compiler uses: local first, shared second, and never an exception for cache trouble."""
import json
import os
import socket
import threading
import time

import pytest

from adaptc.cache import Trial, TuningCache, default_cache, open_cache
from adaptc.cache.sqlite import DB_NAME, SQLiteBackend
from tests.cache.cache_helpers import make_key, make_record, messages
from tests.cache.test_backends import write_raw

SHARED = ["redis_url", "postgres_url"]


@pytest.fixture(params=SHARED)
def shared_url(request):
    return request.getfixturevalue(request.param)


def test_reads_go_local_then_shared_and_a_shared_hit_is_copied_local(shared_url, tmp_path):
    writer = open_cache(shared_url, tmp_path / "a")
    record = make_record(0)
    writer.put(record)
    assert writer.local.get(record.key) == record and writer.shared.get(record.key) == record

    reader = open_cache(shared_url, tmp_path / "b")
    assert reader.local.get(record.key) is None
    found = reader.get(record.key)
    assert found == record and reader.counts["shared_hits"] == 1
    assert reader.local.get(record.key) == record  # copied down
    assert reader.get(record.key) is found and reader.counts["memo_hits"] == 1
    assert reader.get(make_key(7)) is None and reader.counts["misses"] == 1


def test_lookups_are_memoised(tmp_path):
    cache = open_cache(None, tmp_path)
    record = make_record(0)
    cache.put(record)
    for _ in range(100):  # the same object back, from memory: no store is read again
        assert cache.get(record.key) is record
    assert cache.counts["memo_hits"] == 100


@pytest.mark.parametrize("scheme", ["redis", "postgresql"])
def test_a_dead_shared_server_degrades_to_local_with_one_warning(scheme, dead_url, tmp_path, cache_warnings):
    url = dead_url(scheme)
    local_only = open_cache(None, tmp_path)
    known = make_record(0)
    local_only.put(known)

    cache = open_cache(url, tmp_path)
    assert cache.get(known.key) == known          # the compile path still finds local records
    assert cache.get(make_key(1)) is None         # a miss asks the dead server: the one warning
    written = make_record(2)
    cache.put(written)                            # writes go on locally
    assert cache.get(make_key(3)) is None
    assert cache.get(written.key) is written and cache.local.get(written.key) == written
    warned = messages(cache_warnings)
    assert len(warned) == 1, warned
    assert "unavailable" in warned[0] and "secret" not in warned[0]
    assert cache.shared is None and SQLiteBackend(tmp_path / DB_NAME).count() == 2


def test_a_shared_server_that_never_answers_times_out(tmp_path, cache_warnings):
    # Accepts connections and then says nothing: the case a firewall or a hung server produces.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        cache = open_cache(f"redis://127.0.0.1:{port}/0?socket_timeout=0.3&socket_connect_timeout=0.3", tmp_path)
        start = time.monotonic()
        assert cache.get(make_key(0)) is None
        assert time.monotonic() - start < 3
        cache.put(make_record(0))
        assert len(messages(cache_warnings)) == 1
    finally:
        listener.close()


POISONS = {
    "corrupt": ('{"schema": 1, "key": "oops"}', "missing"),
    "foreign version": (lambda: json.dumps(make_record(1).to_dict() | {"schema": 99}), "schema version 99"),
    "deeply nested": ("[" * 100_000, "not valid JSON"),
    "not UTF-8": (b'{"schema": 1, "\xff\xfe": 0}', "not valid JSON"),
}


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("where", ["local", "shared"])
def test_a_poisoned_record_is_ignored_with_a_warning(where, poison, redis_url, tmp_path, cache_warnings):
    cache = open_cache(redis_url, tmp_path)
    good = make_record(0)
    cache.put(good)
    bad_key = make_key(1)
    url = f"sqlite://{tmp_path / DB_NAME}" if where == "local" else redis_url
    text, reason = POISONS[poison]
    write_raw(url, bad_key.digest, text() if callable(text) else text)

    assert cache.get(bad_key) is None
    assert cache.get(bad_key) is None             # the same bad record warns once
    cache._memo.clear()
    assert cache.get(good.key) == good            # and costs only itself
    warned = messages(cache_warnings)
    assert len(warned) == 1 and f"in the {where} cache" in warned[0] and reason in warned[0], warned
    assert cache.shared is not None and cache.local.path == str(tmp_path / DB_NAME)  # no tier was dropped
    if where == "shared":                         # a bad shared record is never copied into the local cache
        assert cache.local.get_text(bad_key.digest) is None
    scan = cache.scan()                           # listing skips it too, and says so
    assert [r.key for r in scan.records] == [good.key] and [i["digest"] for i in scan.invalid] == [bad_key.digest]


def test_a_valid_shared_record_replaces_a_corrupt_local_one(redis_url, tmp_path, cache_warnings):
    record = make_record(0)
    open_cache(redis_url, tmp_path / "elsewhere").put(record)
    cache = open_cache(redis_url, tmp_path)
    cache.local.put(make_record(1))  # creates the table
    write_raw(f"sqlite://{tmp_path / DB_NAME}", record.key.digest, "\x00corrupt")
    assert cache.get(record.key) == record
    assert cache.local.get(record.key) == record
    assert len(messages(cache_warnings)) == 1


def test_a_full_shared_server_keeps_local_results(redis_url, tmp_path, cache_warnings):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1")
    try:
        cache = open_cache(redis_url, tmp_path)
        cache.put(make_record(0))
        cache.put(make_record(1))
        assert cache.local.count() == 2 and cache.shared is not None  # refused writes keep the server
        warned = messages(cache_warnings)
        assert len(warned) == 1 and "maxmemory" in warned[0]
    finally:
        client.config_set("maxmemory", "0")
        client.close()


def test_an_unwritable_cache_dir_falls_back_to_memory(tmp_path, monkeypatch, cache_warnings):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ADAPTC_CACHE_DIR", str(blocker / "cache"))
    cache = default_cache()
    record = make_record(0)
    assert cache.get(record.key) is None
    cache.put(record)
    assert cache.get(record.key) == record
    cache._memo.clear()
    assert cache.get(record.key) == record  # from the in-memory stand-in
    warned = messages(cache_warnings)
    assert len(warned) == 1 and "in memory" in warned[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through file permissions")
def test_a_read_only_cache_dir_falls_back_to_memory(tmp_path, cache_warnings):
    (tmp_path / "ro").mkdir(mode=0o500)
    cache = open_cache(None, tmp_path / "ro")
    cache.put(make_record(0))
    assert cache.get(make_key(0)) is not None and len(messages(cache_warnings)) == 1


def test_a_full_disk_skips_the_write_with_one_warning(tmp_path, cache_warnings):
    cache = open_cache(None, tmp_path)
    small = make_record(0)
    cache.put(small)
    (pages,), = cache.local._run("PRAGMA page_count")
    cache.local._run(f"PRAGMA max_page_count = {pages}")  # SQLite now answers SQLITE_FULL, as on a full disk
    big = make_record(1, trials=[Trial({"i": i}, 1.0) for i in range(2000)])
    cache.put(big)
    cache.put(make_record(2, trials=[Trial({"i": i}, 1.0) for i in range(2000)]))  # warns once per process
    assert cache.get(big.key) is big        # this process keeps its result
    cache._memo.clear()
    assert cache.get(small.key) == small    # what was stored before is still there
    assert cache.get(big.key) is None       # and the refused write really was not stored
    warned = messages(cache_warnings)
    assert len(warned) == 1 and "full" in warned[0]
    assert SQLiteBackend(tmp_path / DB_NAME).count() == 1


def test_a_corrupt_database_file_falls_back_to_memory(tmp_path, cache_warnings):
    (tmp_path / DB_NAME).write_bytes(b"this is not an sqlite database" * 100)
    cache = open_cache(None, tmp_path)
    record = make_record(0)
    cache.put(record)
    cache._memo.clear()
    assert cache.get(record.key) == record  # from the in-memory stand-in
    assert len(messages(cache_warnings)) == 1
    assert (tmp_path / DB_NAME).read_bytes().startswith(b"this is not")  # the user's file is left alone


def test_threads_share_one_cache(tmp_path):
    cache = open_cache(None, tmp_path)
    errors = []

    def work(t):
        try:
            for i in range(50):
                cache.put(make_record(100 * t + i))
                assert cache.get(make_key(100 * t + i)) is not None
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and cache.local.count() == 200


@pytest.mark.parametrize("url", ["mongodb://h/db", "garbage", "tuning.db", "./x/tuning.db"])
def test_an_unknown_url_scheme(url, tmp_path, monkeypatch, cache_warnings):
    from adaptc.errors import CacheError
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CacheError, match="unknown tuning cache URL"):  # a bare path is not a URL either
        open_cache(url)
    monkeypatch.setenv("ADAPTC_CACHE_URL", url)
    assert isinstance(default_cache(), TuningCache) and len(messages(cache_warnings)) == 1
    default_cache().put(make_record(0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adaptc-cache"]  # no file named after the typo


@pytest.mark.parametrize("url", ["redis://u:secret@h:notaport/0", "redis://u:secret@[::1/0",
                                 "postgresql://u:secret@h:99999/db"])
def test_a_malformed_url_is_a_cache_error_and_compile_goes_on(url, monkeypatch, cache_warnings):
    from adaptc.errors import CacheError
    with pytest.raises(CacheError, match="invalid tuning cache URL") as info:
        open_cache(url)
    assert "secret" not in str(info.value) and ":***@" in str(info.value)
    monkeypatch.setenv("ADAPTC_CACHE_URL", url)
    cache = default_cache()  # the compile path: one warning, the local cache
    assert cache.shared is None and cache.get(make_key(0)) is None
    warned = messages(cache_warnings)
    assert len(warned) == 1 and "secret" not in warned[0]


def test_a_redis_option_it_cannot_parse_degrades_like_a_dead_server(tmp_path, cache_warnings):
    cache = open_cache("redis://u:secret@127.0.0.1:1/0?socket_timeout=soon", tmp_path)
    assert cache.get(make_key(0)) is None
    cache.put(make_record(0))
    warned = messages(cache_warnings)
    assert len(warned) == 1 and "socket_timeout" in warned[0] and "secret" not in warned[0]


@pytest.mark.parametrize("scheme", ["redis", "postgresql"])
def test_check_says_when_a_tier_is_down_and_failures_remember_it(scheme, dead_url, tmp_path, cache_warnings):
    from adaptc.errors import CacheError
    cache = open_cache(dead_url(scheme), tmp_path)
    cache.check(shared=False)                     # the local file is fine
    with pytest.raises(CacheError, match="the shared tuning cache is unavailable") as info:
        cache.check()
    assert "secret" not in str(info.value) and cache.failures == {} and messages(cache_warnings) == []
    cache.put(make_record(0))                     # the compile path degrades, and the cache remembers why
    assert list(cache.failures) == ["shared"] and len(messages(cache_warnings)) == 1
