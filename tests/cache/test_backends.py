"""Every backend against a real server: round trip, poisoned values written straight into the store,
and two processes writing at once."""
import json
import multiprocessing
from urllib.parse import urlsplit

import pytest

from adaptc.cache import RecordError, open_backend, open_cache
from adaptc.cache import postgres as pg_backend
from adaptc.cache import redis as redis_backend
from adaptc.cache import sqlite as sqlite_backend
from tests.cache.cache_helpers import make_key, make_record, write_records

KINDS = ["sqlite", "redis", "postgresql"]


@pytest.fixture
def url(request, tmp_path):
    kind = request.param
    if kind == "sqlite":
        return f"sqlite://{tmp_path / 'shared.db'}"
    return request.getfixturevalue("redis_url" if kind == "redis" else "postgres_url")


@pytest.fixture
def backend(url):
    b = open_backend(url)
    yield b
    b.close()


def write_raw(url: str, digest: str, text: str | bytes) -> None:
    """Put `text` into the store directly, the way a broken or hostile writer would (bytes: stored
    as text all the same, UTF-8 or not)."""
    if url.startswith("sqlite"):
        import sqlite3
        conn = sqlite3.connect(url[len("sqlite://"):])
        with conn:
            conn.execute(f"INSERT OR REPLACE INTO {sqlite_backend.TABLE} VALUES (?, 'x', CAST(? AS TEXT))",
                         (digest, text))
        conn.close()
    elif url.startswith("redis"):
        import redis
        client = redis.Redis.from_url(url)
        client.set(redis_backend.PREFIX + digest, text)
        client.sadd(redis_backend.INDEX, digest)
        client.close()
    else:
        import psycopg
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"INSERT INTO {pg_backend.TABLE} (key, kernel, value) VALUES (%s, 'x', %s) "
                         "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", (digest, text))


@pytest.mark.parametrize("url", KINDS, indirect=True)
def test_round_trip(backend):
    records = [make_record(i) for i in range(5)] + [make_record(0, kernel="attention")]
    for r in records:
        assert backend.put(r)
    assert backend.count() == 6
    assert [backend.get(r.key) for r in records] == records
    assert backend.get(make_key(99)) is None
    listed = dict(backend.items())
    assert set(listed) == {r.key.digest for r in records} and all(listed[r.key.digest] == r for r in records)
    stats = backend.stats()
    assert stats["records"] == 6 and stats["kind"] == backend.kind
    password = urlsplit(backend.url).password
    assert password is None or (password not in stats["url"] and ":***@" in stats["url"])


@pytest.mark.parametrize("url", KINDS, indirect=True)
def test_overwrite_rules_and_delete_all(backend):
    first, newer = make_record(0, time_s=2e-3), make_record(0, time_s=1e-3)
    assert backend.put(first)
    assert not backend.put(newer, overwrite=False)  # import's rule: keep what is there
    assert backend.get(first.key).time_s == 2e-3
    assert backend.put(newer)                        # tuning's rule: the newer result wins
    assert backend.get(first.key).time_s == 1e-3
    assert backend.delete_all() == 1 and backend.count() == 0 and backend.get(first.key) is None


@pytest.mark.parametrize("url", KINDS, indirect=True)
def test_poisoned_values_are_refused_and_the_rest_still_read(backend, url):
    good = make_record(0)
    backend.put(good)  # also creates the table
    foreign = make_record(2).to_dict() | {"schema": 99}
    wrong_type = make_record(3).to_dict() | {"time_s": "fast"}
    poisons = {
        make_key(1).digest: "{garbage",
        make_key(2).digest: json.dumps(foreign),
        make_key(3).digest: json.dumps(wrong_type),
        make_key(4).digest: make_record(5).to_json(),  # a valid record under someone else's key
        make_key(5).digest: "[" * 100_000,               # deeper than any JSON parser recurses
    }
    if not url.startswith("postgresql"):  # PostgreSQL itself refuses text that is not UTF-8
        poisons[make_key(6).digest] = b'{"\xff": 1}'
    for digest, text in poisons.items():
        write_raw(url, digest, text)
    for i, reason in [(1, "not valid JSON"), (2, "schema version 99"), (3, "time_s"), (4, "stored under"),
                      (5, "not valid JSON"), (6, "not valid JSON")][:len(poisons)]:
        with pytest.raises(RecordError, match=reason):
            backend.get(make_key(i))
    assert backend.get(good.key) == good
    items = dict(backend.items())
    assert items[good.key.digest] == good
    assert all(isinstance(items[d], RecordError) for d in poisons)


@pytest.mark.parametrize("url", KINDS, indirect=True)
def test_two_processes_writing_at_once(url, tmp_path):
    ctx = multiprocessing.get_context("spawn")  # no fork: the parent's connections must not be shared
    barrier = ctx.Barrier(2)
    n, contested = 40, 5
    procs = [ctx.Process(target=write_records, args=(url, str(tmp_path / f"local{w}"), w, n, contested, barrier))
             for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    cache = open_cache(url, tmp_path / "reader")
    scan = cache.scan()
    assert scan.invalid == []
    assert len(scan.records) == 2 * n + contested
    # Each contested key holds one worker's whole record, never a mix of both.
    for i in range(contested):
        assert cache.get(make_key(i)).time_s in (1e-3, 2e-3)
    cache.close()
