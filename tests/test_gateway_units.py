"""Unit tests of the gateway's pure parts: token buckets, fair queue, circuit breaker, picker, router, config."""
from __future__ import annotations

import asyncio
import hashlib
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.gateway.admission import FairQueue, ModelQueue, Rejected, Waiter
from conveyor.gateway.auth import find_tenant
from conveyor.gateway.budget import budget, check_fits
from conveyor.gateway.body import MAX_DEPTH, BodyError, parse_body
from conveyor.gateway.config import ConfigError, TenantConfig, parse_config
from conveyor.gateway.idempotency import IdempotencyCache, KeyReused
from conveyor.gateway.picker import Breaker, Pool, Replica, affinity_key
from conveyor.gateway.proxy import Flight
from conveyor.gateway.ratelimit import MemoryLimiter, _duration
from conveyor.gateway.router import auto_route
from conveyor.gateway.tokens import count_prompt_tokens, load_tokenizer, prompt_floor
from conveyor.http_limits import BodyTimeout, BodyTooLarge, read_body
from conveyor.prometheus_text import sum_by_name
from conveyor.sampling_params import SamplingParams

H = hashlib.sha256(b"key-a").hexdigest()


def tenant(**kw) -> TenantConfig:
    return TenantConfig(**{"name": "a", "api_key_sha256": H, **kw})


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def run(coro):
    return asyncio.run(coro)


# ---- token buckets ---------------------------------------------------------------------------------------------
def test_request_bucket_burst_then_refill_rate():
    clock = Clock()
    lim = MemoryLimiter(clock)
    t = tenant(requests_per_minute=60, burst=3, tokens_per_minute=10_000)
    assert [run(lim.acquire(t, 10)).allowed for _ in range(4)] == [True, True, True, False]
    d = run(lim.acquire(t, 10))
    assert d.reason == "requests" and d.remaining_requests == 0
    assert d.retry_after_s == pytest.approx(1.0)  # 60/min refills one request per second
    assert d.headers()["retry-after"] == "1"
    clock.t += 0.5
    assert not run(lim.acquire(t, 10)).allowed
    clock.t += 0.5
    d = run(lim.acquire(t, 10))
    assert d.allowed and d.remaining_requests == 0
    clock.t += 100  # refills to the burst capacity, no further
    assert run(lim.acquire(t, 10)).remaining_requests == 2


def test_token_bucket_reserve_refund_and_debt():
    clock = Clock()
    lim = MemoryLimiter(clock)
    t = tenant(requests_per_minute=1000, tokens_per_minute=600)  # 10 tokens/s
    d = run(lim.acquire(t, 500))
    assert d.allowed and d.remaining_tokens == 100 and d.limit_tokens == 600
    d = run(lim.acquire(t, 200))
    assert not d.allowed and d.reason == "tokens"
    assert d.retry_after_s == pytest.approx(10.0)  # 100 missing at 10/s
    assert d.remaining_requests == 999  # a refused request takes nothing
    run(lim.refund(t, 450))  # the request used 50 of its 500
    d = run(lim.acquire(t, 200))
    assert d.allowed and d.remaining_tokens == 350
    run(lim.refund(t, -400))  # used more than reserved: the bucket goes into debt
    d = run(lim.acquire(t, 1))
    assert not d.allowed and d.retry_after_s == pytest.approx(5.1)
    assert run(lim.acquire(t, 10_000)).reason == "too_large"
    assert math.isinf(run(lim.acquire(t, 10_000)).retry_after_s)


def test_ratelimit_headers_and_peek():
    clock = Clock()
    lim = MemoryLimiter(clock)
    t = tenant(requests_per_minute=120, tokens_per_minute=6000)
    run(lim.acquire(t, 3000))
    h = run(lim.acquire(t, 0, take=False)).headers()
    assert h["x-ratelimit-limit-requests"] == "120" and h["x-ratelimit-remaining-requests"] == "119"
    assert h["x-ratelimit-limit-tokens"] == "6000" and h["x-ratelimit-remaining-tokens"] == "3000"
    assert h["x-ratelimit-reset-tokens"] == "30s" and h["x-ratelimit-reset-requests"] == "500ms"
    assert "retry-after" not in h
    assert _duration(360) == "6m0s" and _duration(0.25) == "250ms" and _duration(1.5) == "1.5s"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5), st.integers(0, 400), st.integers(-200, 200)), max_size=60))
def test_bucket_never_admits_more_than_capacity_plus_refill(ops):
    """Whatever the arrivals and refunds, tokens taken over a span never exceed the bucket size plus what refilled
    in that span plus what was refunded."""
    clock = Clock()
    lim = MemoryLimiter(clock)
    t = tenant(requests_per_minute=600, burst=5, tokens_per_minute=600)
    start, taken, requests, refunded = clock.t, 0, 0, 0
    for dt, tokens, refund in ops:
        clock.t += dt
        d = run(lim.acquire(t, tokens))
        if d.allowed:
            taken += tokens
            requests += 1
            if refund > 0:
                run(lim.refund(t, min(refund, tokens)))
                refunded += min(refund, tokens)
        req, tok = lim.buckets["a"]
        assert req.level <= req.capacity and tok.level <= tok.capacity
        elapsed = clock.t - start
        assert requests <= 5 + 10 * elapsed + 1e-6
        assert taken <= 600 + 10 * elapsed + refunded + 1e-6


def test_limits_change_on_reload_keep_level():
    clock = Clock()
    lim = MemoryLimiter(clock)
    run(lim.acquire(tenant(requests_per_minute=60, burst=10), 1))
    d = run(lim.acquire(tenant(requests_per_minute=60, burst=2), 1))
    assert d.allowed and d.limit_requests == 2 and d.remaining_requests == 1  # 9 left, cut to the new 2


# ---- fair queue ----------------------------------------------------------------------------------------------------
def drain(q: FairQueue) -> list[str]:
    out = []
    while (w := q.pop()) is not None:
        out.append(w.tenant)
    return out


def test_flooding_tenant_does_not_delay_a_light_one():
    q = FairQueue()
    for _ in range(10):
        q.push(Waiter("flood", "interactive", 100))
    q.pop()  # one flood request is being served
    q.push(Waiter("light", "interactive", 20))
    q.push(Waiter("light", "interactive", 20))
    order = drain(q)
    assert order[:2] == ["light", "light"], order  # its tags start at the current virtual time


def test_backlogged_tenants_share_by_tokens():
    q = FairQueue()
    for _ in range(20):
        q.push(Waiter("big", "interactive", 200))
    for _ in range(40):
        q.push(Waiter("small", "interactive", 50))
    first = drain(q)[:20]
    served = {"big": 200 * first.count("big"), "small": 50 * first.count("small")}
    assert abs(served["big"] - served["small"]) <= 200, (first, served)


def test_interactive_before_batch_and_weights():
    q = FairQueue()
    q.push(Waiter("b", "batch", 1))
    q.push(Waiter("i", "interactive", 1000))
    assert drain(q) == ["i", "b"]
    for _ in range(6):
        q.push(Waiter("heavy", "interactive", 100, weight=2.0))
        q.push(Waiter("plain", "interactive", 100))
    order = drain(q)
    assert order[:3].count("heavy") >= 2 and order.count("heavy") == 6


def test_removed_waiters_are_skipped_and_not_charged():
    q = FairQueue()
    ws = [Waiter("a", "interactive", 100) for _ in range(3)]
    for w in ws:
        q.push(w)
    q.remove(ws[0])
    assert len(q) == 2 and q.pop() is ws[1]
    assert q.finish[("interactive", "a")] == 200  # three pushed, one rolled back


class FakePool:
    def __init__(self, slots: int) -> None:
        self.slots, self.on_capacity = slots, lambda: None

    def acquire(self, affinity, cost, **kw):
        if self.slots <= 0:
            return None
        self.slots -= 1
        return "replica"

    def release(self, r, cost, ok):
        self.slots += 1
        self.on_capacity()

    def usable(self) -> bool:
        return True


def test_queue_deadline_shedding_and_release():
    async def main():
        pool = FakePool(1)
        q = ModelQueue("m", pool, max_queue=4, shed_batch_ratio=0.5, cold_start_timeout_s=60)
        assert await q.admit(Waiter("a", "interactive", 10)) == "replica"
        loop = asyncio.get_running_loop()
        with pytest.raises(Rejected) as e:
            await q.admit(Waiter("a", "interactive", 10, deadline=loop.time() + 0.05))
        assert e.value.status == 408 and len(q) == 0
        waiting = [asyncio.create_task(q.admit(Waiter("a", "interactive", 10))) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(Rejected) as e:  # half full: batch is shed first
            await q.admit(Waiter("b", "batch", 10))
        assert e.value.status == 503 and e.value.reason == "shed"
        waiting += [asyncio.create_task(q.admit(Waiter("a", "interactive", 10))) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(Rejected):  # full: interactive too
            await q.admit(Waiter("a", "interactive", 10))
        pool.release("replica", 10, True)
        assert await waiting[0] == "replica" and len(q) == 3
        for t in waiting[1:]:
            t.cancel()
        await asyncio.gather(*waiting[1:], return_exceptions=True)
        assert len(q) == 0

    run(main())


def test_queue_without_replicas_waits_for_cold_start_then_503():
    async def main():
        pool = FakePool(0)
        pool.usable = lambda: False
        q = ModelQueue("m", pool, max_queue=4, shed_batch_ratio=0.5, cold_start_timeout_s=0.1)
        with pytest.raises(Rejected) as e:
            await q.admit(Waiter("a", "interactive", 10))
        assert e.value.status == 503 and e.value.reason == "no_replica" and len(q) == 0
        q.cold_start_timeout_s = 30
        waiting = asyncio.create_task(q.admit(Waiter("a", "interactive", 10)))
        await asyncio.sleep(0.05)
        assert not waiting.done() and len(q) == 1
        pool.slots = 1  # a replica was added: the queue is pumped
        pool.on_capacity()
        assert await waiting == "replica"

    run(main())


# ---- circuit breaker and picker ----------------------------------------------------------------------------------
def test_breaker_transitions():
    b = Breaker(failures=3, open_s=5.0)
    b.failure(0.0)
    b.failure(0.1)
    b.success()  # consecutive failures only
    b.failure(1.0)
    b.failure(1.1)
    assert b.available(1.2) and b.state == "closed"
    b.failure(1.2)
    assert b.state == "open" and not b.available(3.0)
    assert b.available(6.3) and b.state == "half_open"
    b.on_dispatch()
    assert not b.available(6.4)  # one trial at a time
    b.failure(6.5)
    assert b.state == "open" and not b.available(11.0)
    b.health_ok(8.0)  # the replica answers its health check: closed at once, not after the rest of the cooldown
    assert b.state == "closed" and b.available(8.0)


def pool_with(*urls: str) -> Pool:
    pool = Pool("m", 4, client=None, affinity_max_load_ratio=2.0)
    for u in urls:
        pool.replicas[u] = Replica(u, Breaker(3, 5.0), started=True)
    return pool


def test_picker_least_work_caps_and_health():
    pool = pool_with("r1", "r2")
    a = pool.acquire(None, 1000)
    b = pool.acquire(None, 10)
    assert {a.url, b.url} == {"r1", "r2"}
    c = pool.acquire(None, 10)
    assert c is b  # fewer outstanding tokens
    b.draining = True
    assert pool.acquire(None, 10) is a
    for _ in range(3):
        pool.failed(a)
    assert pool.acquire(None, 10) is None  # a ejected, b draining
    b.draining = False
    b.in_flight = 4
    assert pool.acquire(None, 10) is None  # b at its cap
    assert pool.acquire(None, 10, ignore_cap=True) is b


def test_picker_prefix_affinity_unless_much_busier():
    pool = pool_with("r1", "r2")
    key = affinity_key("x" * 300, 256)
    assert key is not None and affinity_key("x" * 100, 256) is None
    first = pool.acquire(key, 100)
    pool.release(first, 100, True)
    other = pool.replicas["r2" if first.url == "r1" else "r1"]
    other.in_flight_tokens = 50  # the affinity replica is idle anyway
    other.in_flight = 1
    assert pool.acquire(key, 100) is first
    first.in_flight_tokens += 1000  # now much busier than the other: give up affinity
    first.in_flight += 1
    assert pool.acquire(key, 100) is other
    assert pool.affinity[key] == other.url


# ---- router, auth, config ----------------------------------------------------------------------------------------
def gw_config(**extra):
    return parse_config({
        "models": [{"name": "big", "aliases": ["large"], "replicas": ["http://127.0.0.1:1"]},
                   {"name": "small", "replicas": []}],
        "auto_route": {"small": "small", "large": "big", "max_prompt_tokens_small": 100, "max_tokens_small": 50},
        "tenants": [{"name": "a", "api_key_sha256": H, "class": "interactive", "allow_degrade": True},
                    {"name": "b", "api_key_sha256": "b" * 64, "class": "batch"}], **extra})


def test_auto_route_rule():
    cfg = gw_config()
    a, b = cfg.tenants
    calm = lambda m: False  # noqa: E731
    assert auto_route(cfg, 10, 20, None, a, calm)[0].name == "small"
    assert auto_route(cfg, 101, 20, None, a, calm)[0].name == "big"
    assert auto_route(cfg, 10, 51, None, a, calm)[0].name == "big"
    assert auto_route(cfg, 10, None, None, a, calm)[0].name == "big"  # max_tokens_small set: unknown is large
    assert auto_route(cfg, 500, 20, "small", a, calm)[0].name == "small"
    assert auto_route(cfg, 1, 1, "large", a, calm)[0].name == "big"
    big_busy = lambda m: m == "big"  # noqa: E731
    assert auto_route(cfg, 500, 20, None, a, big_busy) == (cfg.model("small"), "degraded")
    assert auto_route(cfg, 500, 20, None, b, big_busy)[0].name == "big"  # batch is never degraded
    assert auto_route(cfg, 500, 20, None, a, lambda m: True)[0].name == "big"  # small busy too
    assert cfg.model("large").name == "big"


def test_find_tenant_by_key_hash():
    cfg = gw_config()
    assert find_tenant("Bearer key-a", cfg.tenants).name == "a"
    assert find_tenant("Bearer key-b", cfg.tenants) is None
    assert find_tenant("key-a", cfg.tenants) is None
    assert find_tenant(None, cfg.tenants) is None


@pytest.mark.parametrize("patch, field", [
    ({"tenants": [{"name": "a", "api_key_sha256": "xyz"}]}, "tenants[0].api_key_sha256"),
    ({"tenants": [{"name": "a", "api_key_sha256": H, "class": "vip"}]}, "tenants[0].class"),
    ({"tenants": [{"name": "a", "api_key_sha256": H, "requests_per_minute": 0}]}, "tenants[0].requests_per_minute"),
    ({"tenants": [{"name": "a", "api_key_sha256": H, "colour": "red"}]}, "tenants[0].colour"),
    ({"tenants": [{"api_key_sha256": H}]}, "tenants[0].name"),
    ({"models": [{"name": "m", "replicas": ["localhost:80"]}]}, "models[0].replicas"),
    ({"models": [{"name": "m", "aliases": ["m"]}]}, "models[0]"),
    ({"models": [{"name": "m", "max_queue": 0}]}, "models[0].max_queue"),
    ({"models": []}, "models"),
    ({"auto_route": {"small": "nope", "large": "m"}}, "auto_route.small"),
    ({"redis_url": "http://x"}, "redis_url"),
    ({"cold_start_timeout_s": -1}, "cold_start_timeout_s"),
    ({"bogus": 1}, "bogus"),
    ({"tenants": [{"name": "a", "api_key_sha256": H, "models": ["nope"]}]}, "tenants[0].models"),
    ({"shed_batch_queue_ratio": "x"}, "shed_batch_queue_ratio"),  # a wrong type is not "missing"
    ({"ratelimit_on_redis_error": "maybe"}, "ratelimit_on_redis_error"),
])
def test_config_errors_name_the_field(patch, field):
    raw = {"models": [{"name": "m"}], "tenants": [{"name": "a", "api_key_sha256": H}], **patch}
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert str(e.value).startswith(field + ":") or str(e.value).startswith(field + " "), str(e.value)


def test_config_defaults():
    cfg = parse_config({"models": [{"name": "m", "replicas": ["http://h:1/"]}],
                        "tenants": [{"name": "a", "api_key_sha256": H.upper(), "requests_per_minute": 30}]})
    t = cfg.tenants[0]
    assert t.cls == "interactive" and t.burst == 30 and t.api_key_sha256 == H
    assert cfg.models[0].replicas == ["http://h:1"] and cfg.models[0].upstream_model == "m"
    assert cfg.cold_start_timeout_s == 60


def test_tenants_may_use_only_their_models():
    cfg = parse_config({"models": [{"name": "s", "aliases": ["s2"]}, {"name": "l"}, {"name": "x"}],
                        "auto_route": {"small": "s", "large": "l"},
                        "tenants": [{"name": "all", "api_key_sha256": H},
                                    {"name": "two", "api_key_sha256": "b" * 64, "models": ["s2", "l"]},
                                    {"name": "one", "api_key_sha256": "c" * 64, "models": ["s"]}]})
    every, two, one = cfg.tenants
    assert all(cfg.may_use(every, n) for n in ("s", "s2", "l", "x", "auto")) and not cfg.may_use(every, "nope")
    assert [n for n in ("s", "s2", "l", "x", "auto") if cfg.may_use(two, n)] == ["s", "s2", "l", "auto"]
    assert [n for n in ("s", "s2", "l", "x", "auto") if cfg.may_use(one, n)] == ["s", "s2"]  # auto needs both


def test_replica_urls_are_checked_and_normalized():
    from conveyor.gateway.config import replica_url

    assert replica_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert replica_url("https://[::1]:443") == "https://[::1]:443"
    for bad in ("http://\ud800:1", "http://", "http://[::1", "http://a:99999", "http://a:0", "http://a b",
                "http://h:1/v1", "http://u:p@h:1", "ftp://h:1"):
        with pytest.raises(ValueError):
            replica_url(bad)
    with pytest.raises(ConfigError, match=r"models\[0\]\.replicas"):
        parse_config({"models": [{"name": "m", "replicas": ["http://a b"]}],
                      "tenants": [{"name": "t", "api_key_sha256": "a" * 64}]})


def test_readme_example_config_is_valid(monkeypatch):
    import pathlib
    import re

    import yaml

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"A complete `gateway.yaml`.*?```yaml\n(.*?)```", readme, re.S).group(1)
    for i, digest in enumerate((H, "b" * 64, "c" * 64)):  # the README's placeholders, one per key
        block = block.replace("<hex>", digest, 1) if i < 2 else block.replace("<hex>", digest)
    monkeypatch.setenv("BIG_REPLICA_KEY", "replica-key")
    cfg = parse_config(yaml.safe_load(block))
    assert cfg.models[0].upstream_api_key == "replica-key"
    assert [m.name for m in cfg.models] == ["big", "small"] and cfg.model("large").name == "big"
    assert cfg.auto_route.max_prompt_tokens_small == 256 and cfg.redis_url.startswith("redis://")
    assert [t.cls for t in cfg.tenants] == ["interactive", "batch"] and cfg.tenants[0].max_concurrent == 32


# ---- request bodies (issue 11: checked before any slot is taken) ---------------------------------------------------


@pytest.mark.parametrize("raw, chat, param", [
    (b'{"model": "m", "messages": 5}', True, "messages"),
    (b'{"model": "m", "messages": [5]}', True, "messages.0"),
    (b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}', True,
     "messages.0.content"),
    (b'{"model": "m", "messages": [{"role": "user", "content": [7]}]}', True, "messages.0.content"),
    (b'{"model": "m", "messages": [{"content": "hi"}]}', True, "messages.0.role"),
    (b'{"model": "m", "prompt": "x", "stream_options": "x"}', False, "stream_options"),
    (b'{"model": "m", "prompt": "x", "stream_options": {"include_usage": "maybe"}}', False,
     "stream_options.include_usage"),
    (b'{"model": "m", "prompt": {"a": 1}}', False, "prompt"),
    (b'{"model": "m", "prompt": [1, "a"]}', False, "prompt"),
    (b'{"model": "m", "prompt": "x", "max_tokens": "many"}', False, "max_tokens"),
    (b'{"model": "m", "prompt": "x", "n": [2]}', False, "n"),
    (b'{"model": "m", "prompt": "x", "temperature": "hot"}', False, "temperature"),
    (b'{"model": "m", "prompt": "x", "cache_salt": 5}', False, "cache_salt"),
    (b'{"model": 5, "prompt": "x"}', False, "model"),
    (b'{"prompt": "x"}', False, "model"),
])
def test_malformed_fields_the_gateway_reads_are_400(raw, chat, param):
    with pytest.raises(BodyError) as e:
        parse_body(raw, chat)
    assert e.value.param == param, e.value.message


@pytest.mark.parametrize("raw", [
    b'{"model": "m", "prompt": "\\ud800"}',  # a lone surrogate: valid JSON, not text
    b'{"model": "m", "messages": [{"role": "user", "content": "a\\udfffb"}]}',
    b'{"model": "m", "prompt": "x", "\\ud83d": 1}',  # in a key, a field the gateway does not read
    b'{"model": "m", "prompt": "x", "temperature": NaN}',
    b'{"model": "m", "prompt": "x", "temperature": Infinity}',
    b'{"model": "m", "prompt": "x", "top_p": 1e999}',  # overflows to inf
    b'{"model": "m", "prompt": "\xff\xfe"}',  # not UTF-8
    b'{"model": "m", "prompt": "x", "extra": ' + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"}",
    b'{"model": "m", "prompt": "x", "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # past the recursion limit
    b'["model"]',
    b'{"model": "m", "prompt": "x"',
    b"",
])
def test_bodies_that_are_not_json_text_are_400(raw):
    for chat in (False, True):
        with pytest.raises(BodyError):
            parse_body(raw, chat)


def test_body_summary():
    p = parse_body(b'{"model": "m", "prompt": ["ab", "cd"], "temperature": 0, "n": 2, "max_tokens": "7", '
                   b'"stream": true, "stream_options": {"include_usage": true}, "user": "u", "top_k": 3}', False)
    assert (p.model, p.stream, p.include_usage, p.coalescable) == ("m", True, True, True)
    assert (p.max_tokens, p.n, p.num_prompts, p.texts) == (7, 2, 2, ["ab", "cd"])  # coerced as the replica does
    q = parse_body(b'{"model": "other", "prompt": ["ab", "cd"], "temperature": 0, "n": 2, "max_tokens": "7", '
                   b'"top_k": 3}', False)
    assert q.digest == p.digest  # model, stream, stream_options and user are not "the request"
    c = parse_body(b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, '
                   b'{"type": "image_url", "image_url": {"url": "x"}}]}], "seed": 1, "logprobs": true, '
                   b'"max_completion_tokens": 9, "max_tokens": 3}', True)
    assert c.texts == ["user:hi\n"] and c.max_tokens == 9 and c.coalescable  # each client gets the replica's body
    ids = parse_body(b'{"model": "m", "prompt": [[1, 2], [3]], "n": 3}', False)
    assert (ids.token_ids, ids.id_lengths, ids.num_prompts, ids.n, ids.texts) == (3, [2, 1], 2, 3, [])


def test_digest_holds_every_field_that_changes_the_response():
    base = {"model": "m", "prompt": "x", "temperature": 0}
    d = parse_body(json.dumps(base).encode(), False).digest
    for extra in ({"logprobs": 0}, {"logprobs": None}, {"echo": False}, {"logit_bias": {"5": 1}}, {"n": 1},
                  {"response_format": {"type": "json_object"}}, {"structured_outputs": {"regex": "a"}},
                  {"stream_options": {"continuous_usage_stats": True}}, {"unknown_field": 1}):
        assert parse_body(json.dumps({**base, **extra}).encode(), False).digest != d, extra
    for same in ({"user": "u"}, {"priority": 5}, {"model": "alias"}, {"stream_options": {"include_usage": True}}):
        assert parse_body(json.dumps({**base, **same}).encode(), False).digest == d, same


def _budget(body: dict, chat: bool, prompt: int, mml: int = 1024, cap: int | None = None) -> tuple[int, int | None]:
    b = budget(parse_body(json.dumps({"model": "m", **body}).encode(), chat), prompt, mml, cap)
    return b.reserve, b.max_tokens


def test_budget_reserves_what_the_replica_allows():
    msgs = {"messages": [{"role": "user", "content": "hi"}]}
    assert _budget({"prompt": "x"}, False, 10) == (10 + 16, None)  # a completion's default
    assert _budget({"prompt": "x", "max_tokens": None}, False, 10) == (1024, None)  # null: to the end of the context
    assert _budget({"prompt": ["a", "b"], "n": 2}, False, 10) == (10 + 16 * 4, None)
    assert _budget({"prompt": ["a", "b"], "n": 2, "max_tokens": None}, False, 10) == (10 + 2 * (2048 - 10), None)
    assert _budget({"prompt": "x", "best_of": 3, "max_tokens": 5}, False, 10) == (10 + 15, None)
    assert _budget({"prompt": "x", "use_beam_search": True, "beam_width": 4, "max_tokens": 5}, False, 10) \
        == (30, None)
    assert _budget(msgs, True, 24) == (1024, None)
    assert _budget({**msgs, "max_completion_tokens": 7, "max_tokens": 100}, True, 24) == (24 + 7, None)
    assert _budget({**msgs, "max_tokens": 100}, True, 24) == (124, None)
    assert _budget(msgs, True, 2000) == (2000, None)  # over the context: the replica refuses it
    # the operator's cap: forwarded when it is below the replica's own limit, never raising it
    assert _budget(msgs, True, 24, cap=8) == (32, 8)
    assert _budget({"prompt": "x"}, False, 10, cap=8) == (18, 8)
    assert _budget({"prompt": "x"}, False, 10, cap=256) == (26, None)
    assert _budget({"prompt": "x", "max_tokens": 300}, False, 10, cap=8) == (310, None)  # the client's own limit


_CHAT = {"messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize("body, chat, param", [
    ({"max_tokens": 10**21}, False, "max_tokens"), ({"max_tokens": 2**63}, False, "max_tokens"),
    ({"max_tokens": 0}, False, "max_tokens"), ({"max_tokens": -5}, False, "max_tokens"),
    ({"n": 10**30}, False, "n"), ({"n": 129}, False, "n"), ({"n": 0}, False, "n"),
    ({"best_of": 10**30}, False, "best_of"), ({"best_of": 2, "n": 3}, False, "best_of"),
    ({"beam_width": 10**30, "use_beam_search": True}, False, "beam_width"),
    ({"beam_width": 65, "use_beam_search": True}, False, "beam_width"),
    ({"n": 3, "beam_width": 2, "use_beam_search": True}, False, "n"),
    ({"best_of": 3, "use_beam_search": True}, False, "use_beam_search"),
    ({"max_completion_tokens": 10**30}, True, "max_completion_tokens"),
    ({"max_tokens": 10**30}, True, "max_tokens"), ({"n": 10**30}, True, "n"),
])
def test_sizes_the_replica_refuses_are_400s_before_any_reservation(body, chat, param):
    """What sizes the reservation is held to the replica's own bounds, with its message and param: a hopeless
    request is a 400 here, not a 429 for a reservation over the tenant's quota (which clients retry)."""
    with pytest.raises(BodyError) as e:
        parse_body(json.dumps({"model": "m", **(_CHAT if chat else {"prompt": "x"}), **body}).encode(), chat)
    assert e.value.param == param, e.value.message
    sp = {**{k: k for k in body}, "max_completion_tokens": "max_tokens"}
    with pytest.raises(ValueError) as direct:  # the replica's check: the same message
        kw = {sp[k]: v for k, v in body.items()}
        SamplingParams(**{**kw, "beam_width": kw.get("beam_width", kw.get("n", 1))})
    assert e.value.message == str(direct.value)


def test_chat_best_of_is_left_to_the_replica():
    """Chat has no best_of (the replica refuses it as unknown, or ignores it when lenient): it sizes nothing."""
    p = parse_body(json.dumps({"model": "m", **_CHAT, "best_of": 10**30, "max_tokens": 5}).encode(), True)
    assert p.n == 1 and p.max_tokens == 5


@pytest.mark.parametrize("body, chat, mml, cap, fits", [
    ({"prompt": "x" * 1009}, False, 1024, None, False),  # the default 16 does not fit
    ({"prompt": "x" * 1008}, False, 1024, None, True),
    ({"prompt": "x" * 1009}, False, 1024, 15, True),  # the operator's cap is what the replica gets
    ({"prompt": "x" * 1024, "max_tokens": None}, False, 1024, None, False),  # no room for one token
    ({"prompt": "x" * 1023, "max_tokens": None}, False, 1024, None, True),
    ({"prompt": "x", "max_tokens": 5000}, False, 4096, None, False),
    ({"prompt": [[1, 2, 3], [4] * 10], "max_tokens": 1021}, False, 1024, None, True),  # per prompt: the shortest
    ({"prompt": [[1, 2, 3], [4] * 10], "max_tokens": 1022}, False, 1024, None, False),
    ({"prompt": ["ab", "abcd"], "max_tokens": 1022}, False, 1024, None, True),
    ({"prompt": ["ab", "abcd"], "max_tokens": 1023}, False, 1024, None, False),
    ({"max_completion_tokens": 5000}, True, 4096, None, False),
    ({"max_tokens": 4096}, True, 4096, None, True),  # the template's tokens are the replica's to count
])
def test_check_fits_refuses_only_what_cannot_fit(body, chat, mml, cap, fits):
    p = parse_body(json.dumps({"model": "m", **(_CHAT if chat else {}), **body}).encode(), chat)
    floor = prompt_floor(p, load_tokenizer("demo"), 10**6)  # demo: one token per byte, no BOS
    if fits:
        check_fits(p, floor, mml, cap)
        return
    with pytest.raises(BodyError) as e:
        check_fits(p, floor, mml, cap)
    assert e.value.param == ("messages" if chat else "prompt") and f"length of {mml} tokens" in e.value.message


def test_prompt_floor_is_a_lower_bound_or_zero():
    text = parse_body(json.dumps({"model": "m", "prompt": "hello"}).encode(), False)
    tok = load_tokenizer("demo")
    assert prompt_floor(text, tok, 100) == 5
    assert prompt_floor(text, tok, 4) == 0  # longer than what may be tokenized: unknown
    assert prompt_floor(text, None, 100) == 0  # no tokenizer: unknown (chars / 4 is an estimate, not a bound)
    assert prompt_floor(text, tok, 100, counted=count_prompt_tokens(text, tok, 100)) == 5  # not counted twice
    ids = parse_body(json.dumps({"model": "m", "prompt": [1, 2, 3]}).encode(), False)
    assert prompt_floor(ids, None, 100) == 3


def test_token_count_caps_what_it_tokenizes():
    tok = load_tokenizer("demo")  # byte-level: one token per byte
    text = "hello world " * 10_000
    p = parse_body(json.dumps({"model": "m", "prompt": text}).encode(), False)
    assert count_prompt_tokens(p, tok, 10**9) == len(text)
    assert count_prompt_tokens(p, tok, 1000) == len(text)  # extrapolated at the measured ratio
    chat = parse_body(json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode(), True)
    exact = count_prompt_tokens(chat, tok, 10**9)  # through the chat template
    assert exact > len(text) and abs(count_prompt_tokens(chat, tok, 1000) - exact) < 0.01 * exact
    assert count_prompt_tokens(p, None, 1000) == math.ceil(len(text) / 4)


# ---- idempotency cache: bounded by age, count and bytes -----------------------------------------------------------


def finished_flight(nbytes: int, status: int = 200) -> Flight:
    f = Flight(stream=False)
    f.finish(status, "x" * nbytes)
    return f


def test_idempotency_cache_bounded_by_bytes_oldest_first():
    async def main():
        clock = Clock()
        cache = IdempotencyCache(window_s=600, max_entries=100, max_bytes=10_000, clock=clock)
        for i in range(5):
            cache.put("a", f"k{i}", "h", finished_flight(3000))
            clock.t += 1
        assert cache.nbytes <= 10_000 and len(cache) == 3
        assert [k for _, k in cache.entries] == ["k2", "k3", "k4"]  # the oldest went first
        assert cache.get("a", "k0", "h") is None and cache.get("a", "k4", "h") is not None
        with pytest.raises(KeyReused):
            cache.get("a", "k4", "another request")
        cache.put("a", "huge", "h", finished_flight(20_000))  # bigger than the bound on its own: not kept
        assert len(cache) == 0 and cache.nbytes == 0
        # a live flight is counted when it ends; a failed one is dropped then
        live = Flight(stream=False)

        async def run(f: Flight, status: int, body: str) -> None:
            await asyncio.sleep(0)
            f.finish(status, body)
        live.task = asyncio.create_task(run(live, 200, "y" * 4000))
        failed = Flight(stream=True)
        failed.task = asyncio.create_task(run(failed, 502, "z"))
        cache.put("a", "live", "h", live)
        cache.put("b", "failed", "h", failed)
        assert cache.nbytes == 0 and len(cache) == 2
        await asyncio.gather(live.task, failed.task)
        await asyncio.sleep(0)
        assert cache.nbytes == 4000 and [k for _, k in cache.entries] == ["live"]
        clock.t += 601  # past the window
        assert cache.get("a", "live", "h") is None and cache.nbytes == 0

    run(main())


def test_idempotency_cache_never_keeps_an_incomplete_response():
    """Only a whole response is replayed: 200, and a stream ended by the replica's own [DONE]. A stream whose flight
    was cancelled when its last client left (events, no [DONE]), a cut stream, an error status or a flight cancelled
    before it started are forgotten, so the retry runs again."""
    async def main():
        cache = IdempotencyCache(window_s=600, max_entries=100, max_bytes=1 << 20)

        def streamed(*lines: str) -> Flight:
            f = Flight(stream=True)
            for line in lines:
                f.push_event(line)
            return f

        event = 'data: {"choices": [{"index": 0, "text": "x"}]}'
        whole = streamed(event, "data: [DONE]")
        cancelled = streamed(event)  # its last client left: Forwarder.run finishes it without [DONE]
        cut = streamed(event)
        cut.cut = True
        cut.push_event('data: {"error": {"message": "cut"}}')
        cut.push_event("data: [DONE]")
        flights = {"whole": whole, "cancelled": cancelled, "cut": cut, "400": finished_flight(10, 400),
                   "ok": finished_flight(10)}
        for f in flights.values():
            f.finish(499)
        never = Flight(stream=True)  # cancelled before its task ever ran: never finished
        never.task = asyncio.create_task(asyncio.sleep(10))
        never.task.cancel()
        flights["never"] = never
        for k, f in flights.items():
            cache.put("a", k, "h", f)
        await asyncio.gather(never.task, return_exceptions=True)
        kept = {k for k in flights if cache.get("a", k, "h") is not None}
        assert kept == {"whole", "ok"}

    run(main())


def test_idempotency_cache_bounded_by_count():
    cache = IdempotencyCache(window_s=600, max_entries=3, max_bytes=1 << 30)
    for i in range(10):
        cache.put("a", f"k{i}", "h", finished_flight(10))
    assert [k for _, k in cache.entries] == ["k7", "k8", "k9"] and cache.nbytes == 30


def test_idempotency_cache_a_flooding_tenant_evicts_only_its_own():
    """Over the count or byte bound, the tenant holding the most goes first (its oldest entry): one tenant's flood
    of keys never pushes out another's entries, and both global bounds still hold."""
    cache = IdempotencyCache(window_s=600, max_entries=100, max_bytes=1 << 30)
    cache.put("b", "b-order-1", "h", finished_flight(10))
    for i in range(120):
        cache.put("a", f"a-{i}", "h", finished_flight(10))
    assert len(cache) == 100 and cache.get("b", "b-order-1", "h") is not None
    assert cache.get("a", "a-0", "h") is None and cache.get("a", "a-119", "h") is not None  # a's oldest went

    cache = IdempotencyCache(window_s=600, max_entries=1000, max_bytes=10_000)
    cache.put("b", "b1", "h", finished_flight(2000))
    cache.put("b", "b2", "h", finished_flight(2000))
    for i in range(30):
        cache.put("a", f"a-{i}", "h", finished_flight(1000))
    assert cache.nbytes <= 10_000
    assert {k for t, k in cache.entries if t == "b"} == {"b1", "b2"}
    cache.put("b", "huge", "h", finished_flight(9000))  # now b holds the most: b's own oldest go first
    assert cache.nbytes <= 10_000 and cache.get("b", "b1", "h") is None
    assert sum(t == "a" for t, _ in cache.entries) >= 1


# ---- breakers: what counts, and who wakes the queue --------------------------------------------------------------
def test_breaker_opened_wakes_the_queue_when_half_open():
    """An open breaker becomes usable after open_s without any event; the pool must pump its queue then."""
    async def main():
        pool = Pool("m", 4, client=None)
        pool.replicas["r"] = r = Replica("r", Breaker(2, 0.05), started=True)
        woken = asyncio.Event()
        pool.on_capacity = woken.set
        pool.failed(r)
        pool.failed(r)
        assert r.breaker.state == "open" and not pool.usable()
        await asyncio.wait_for(woken.wait(), 5)
        assert pool.usable() and pool.acquire(None, 1) is r  # the half-open trial

    run(main())


def test_queue_waiting_behind_an_open_breaker_is_dispatched_on_recovery():
    async def main():
        pool = Pool("m", 4, client=None)
        pool.replicas["r"] = r = Replica("r", Breaker(1, 0.1), started=True)
        q = ModelQueue("m", pool, max_queue=8, shed_batch_ratio=0.5, cold_start_timeout_s=30)
        pool.failed(r)
        waiting = [asyncio.create_task(q.admit(Waiter("a", "interactive", 10))) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert len(q) == 3 and not any(t.done() for t in waiting)
        first = await asyncio.wait_for(waiting[0], 5)  # the half-open trial goes first ...
        assert first is r and not waiting[1].done()
        pool.release(r, 10, True)  # ... and its success closes the breaker: the rest follow
        assert await asyncio.wait_for(asyncio.gather(*waiting[1:]), 5) == [r, r]
        for _ in range(2):
            pool.release(r, 10, True)
        assert r.in_flight == 0 and len(q) == 0

    run(main())


# ---- reading bodies, Prometheus text, Redis fallback ---------------------------------------------------------------


def test_read_body_stops_at_the_limit_and_the_deadline():
    async def main():
        sent = 0

        async def chunks(n: int, size: int, delay: float = 0.0):
            nonlocal sent
            for _ in range(n):
                await asyncio.sleep(delay)
                sent += size
                yield b"x" * size

        assert len(await read_body(chunks(4, 100), 400, 5)) == 400
        sent = 0
        with pytest.raises(BodyTooLarge):
            await read_body(chunks(1000, 1 << 16), 1 << 20, 5)
        assert sent <= (1 << 20) + (1 << 16)  # nothing read past the limit
        with pytest.raises(BodyTimeout):
            await read_body(chunks(1000, 1, delay=0.01), 1 << 20, 0.1)

    run(main())


def test_one_prometheus_parser():
    text = ('# HELP conveyor_requests_running r\n# TYPE conveyor_requests_running gauge\n'
            'conveyor_requests_running{model="a"} 2.0\nconveyor_requests_running{model="b"} 1.0\n'
            '# TYPE conveyor_requests_waiting gauge\nconveyor_requests_waiting{model="a"} 3.0\n')
    assert sum_by_name(text, ["conveyor_requests_running", "conveyor_requests_waiting", "absent"]) == {
        "conveyor_requests_running": 3.0, "conveyor_requests_waiting": 3.0}
    with pytest.raises(ValueError):
        sum_by_name("<html>not metrics</html>", ["x"])


def test_redis_unreachable_falls_back_as_configured_without_quota_headers(caplog):
    from conveyor.gateway.ratelimit import RedisLimiter
    from server_process import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there: connections are refused

    async def main():
        ops: list[str] = []
        for mode in ("open", "closed"):
            lim = RedisLimiter(url, on_error=mode, on_fallback=ops.append)
            d = await lim.acquire(tenant(), 10)
            assert d.allowed == (mode == "open") and not d.checked
            assert not any(h.startswith("x-ratelimit") for h in d.headers())  # no quota it did not check
            assert (d.reason, d.headers()) == ((None, {}) if mode == "open" else ("unavailable", {"retry-after": "1"}))
            await lim.acquire(tenant(), 10)
            await lim.refund(tenant(), 5)
            await lim.close()
        assert ops == ["acquire", "acquire", "refund"] * 2

    with caplog.at_level("WARNING", logger="conveyor.gateway"):
        run(main())
    assert sum('"ratelimit_store_down"' in r.getMessage() for r in caplog.records) == 2  # once per outage
