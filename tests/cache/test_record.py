import json

import pytest
from tests.cache.cache_helpers import make_key, make_record

from adaptc.cache import SCHEMA_VERSION, RecordError, RecordKey, Trial, TuningRecord
from adaptc.cache.record import kernel_matches, redact_url


def test_json_round_trip_keeps_every_field():
    record = make_record(3)
    text = record.to_json()
    back = TuningRecord.from_json(text, expect_digest=record.key.digest)
    assert back == record
    assert back.trials[1].status == "crashed" and back.trials[1].time_s is None
    assert json.loads(text)["schema"] == SCHEMA_VERSION


def test_key_is_order_independent_and_every_field_counts():
    a = make_key(0)
    b = RecordKey(kernel="fused_moe", source_hash="src0", problem={"experts": 8, "tokens": 64}, dtype="bfloat16",
                  device=a.device, torch=a.torch, triton=a.triton)
    assert a == b and a.digest == b.digest and hash(a) == hash(b)
    for field, value in [("kernel", "other"), ("source_hash", "src1"), ("dtype", "float16"), ("device", "gpu-x"),
                         ("torch", "2.14.0"), ("triton", "3.7.0")]:
        changed = RecordKey(**{**a.to_dict(), "problem": a.problem, field: value})
        assert changed.digest != a.digest, field


def test_config_of_a_record_is_read_only():
    record = make_record(0)
    with pytest.raises(TypeError):
        record.config["BLOCK_M"] = 1
    assert dict(**record.config) == {"BLOCK_M": 64, "num_warps": 4}


def _mutated(change):
    data = make_record(0).to_dict()
    change(data)
    return json.dumps(data)


@pytest.mark.parametrize("text, reason", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "record must be a JSON object"),
    (_mutated(lambda d: d.update(schema=SCHEMA_VERSION + 1)), "schema version"),
    (_mutated(lambda d: d.update(schema=True)), "schema version"),
    (_mutated(lambda d: d.pop("schema")), "schema version"),
    (_mutated(lambda d: d.update(time_s="fast")), "time_s"),
    (_mutated(lambda d: d.update(time_s=-1.0)), "time_s"),
    (_mutated(lambda d: d.update(time_s=None)), "time_s"),
    (_mutated(lambda d: d.update(status="great")), "status"),
    (_mutated(lambda d: d.update(config=[64, 4])), "config"),
    (_mutated(lambda d: d["config"].update(BLOCK_M=[64])), "config.BLOCK_M"),
    (_mutated(lambda d: d["key"].update(kernel=7)), "key.kernel"),
    (_mutated(lambda d: d["key"].update(problem={"tokens": {"a": 1}})), "key.problem.tokens"),
    (_mutated(lambda d: d["key"].pop("device")), "missing ['device']"),
    (_mutated(lambda d: d.update(pickle="gASV")), "unexpected ['pickle']"),
    (_mutated(lambda d: d.update(trials={"a": 1})), "trials"),
    (_mutated(lambda d: d.update(created_at="yesterday")), "created_at"),
    (_mutated(lambda d: d.update(time_s=10 ** 400)), "time_s"),
    (make_record(0).to_json().replace("0.0001", "NaN"), "NaN"),
])
def test_strict_parsing_names_what_is_wrong(text, reason):
    with pytest.raises(RecordError, match=None) as info:
        TuningRecord.from_json(text)
    assert reason in str(info.value)


def test_a_record_found_under_another_key_is_refused():
    record = make_record(0)
    with pytest.raises(RecordError, match="stored under"):
        TuningRecord.from_json(record.to_json(), expect_digest=make_key(1).digest)


def test_a_failed_tuning_is_recorded_without_a_time():
    record = TuningRecord(make_key(0), config={}, time_s=None, status="crashed")
    assert TuningRecord.from_json(record.to_json()) == record
    with pytest.raises(RecordError):
        Trial({"a": 1}, None, "ok")


@pytest.mark.parametrize("url, shown", [
    ("redis://u:secret@h:6379/0", "redis://u:***@h:6379/0"),
    ("redis://:secret@h/0", "redis://:***@h/0"),
    ("postgresql://me@corp.com:secret@h/db", "postgresql://me@corp.com:***@h/db"),
    ("postgresql://u@host/db?password=secret", "postgresql://u@host/db?password=***"),
    ("postgresql://u@h/db?sslmode=require&sslpassword=secret&PGPASS=secret#x",
     "postgresql://u@h/db?sslmode=require&sslpassword=***&PGPASS=***#x"),
    ("redis://h/0?api_token=secret&client_secret=secret&db=1", "redis://h/0?api_token=***&client_secret=***&db=1"),
    ("redis://u:secret@h:notaport/0", "redis://u:***@h:notaport/0"),  # malformed URLs are what errors quote
    ("redis://u:secret@[::1/0", "redis://u:***@[::1/0"),
    ("redis://u:sec@r/et@h/0", "redis://u:***@h/0"),  # an unescaped @ or / in the password
    ("redis://u@h:6379/0", "redis://u@h:6379/0"),
    ("sqlite:////data/a:b/tuning.db", "sqlite:////data/a:b/tuning.db"),
    ("garbage", "garbage"),
])
def test_redact_url_hides_every_password(url, shown):
    assert redact_url(url) == shown


def test_a_kernel_filter_names_a_kernel_or_one_implementation():
    assert kernel_matches("fused_moe/cpu", "fused_moe") and kernel_matches("fused_moe/cpu", "fused_moe/cpu")
    assert kernel_matches("fused_moe", "fused_moe")
    assert not kernel_matches("fused_moe/cpu", "fused_moe/triton") and not kernel_matches("fused_moe_x/cpu", "fused_moe")
    assert not kernel_matches("fused_moe/cpu", "fused")
