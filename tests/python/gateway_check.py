"""Drives a keypool gateway (/llm/api/team/v1) with the official `openai` SDK.
Run by tests/e2e/gateways.rs against its `team` gateway (exact secret, models [gpt-4o-mini,
deepseek], secret:3/minute, prompt_template, param_map deepseek -> gpt-4o-mini).

Environment: KEYPOOL_BASE_URL (ending in /v1) and KEYPOOL_TOKEN (the gateway secret).
"""

import os
import sys

import openai
from openai import OpenAI

BASE = os.environ["KEYPOOL_BASE_URL"]
client = OpenAI(base_url=BASE, api_key=os.environ["KEYPOOL_TOKEN"], max_retries=0)
MESSAGES = [{"role": "user", "content": "Hello there friend"}]
checks = []


def check(name):
    def wrap(fn):
        checks.append((name, fn))
        return fn
    return wrap


@check("chat through the gateway, rate-limit headers")
def _():
    raw = client.chat.completions.with_raw_response.create(model="deepseek", messages=MESSAGES)
    r = raw.parse()
    assert r.choices[0].message.content.startswith("Hello from"), r
    # the template added two words: "Answer briefly:"
    assert r.usage.prompt_tokens == 7, r.usage
    assert raw.headers["x-ratelimit-limit-requests"] == "3", raw.headers
    assert raw.headers["x-ratelimit-remaining-requests"] == "2", raw.headers


@check("stream with usage asked")
def _():
    chunks = list(client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Hello"), text
    assert chunks[-1].usage.total_tokens == 12, chunks[-1]


@check("wrong secret -> AuthenticationError")
def _():
    bad = OpenAI(base_url=BASE, api_key="not-the-secret", max_retries=0)
    try:
        bad.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    except openai.AuthenticationError as e:
        assert e.code == "invalid_api_key", e
    else:
        raise AssertionError("no error")


@check("model outside the gateway -> NotFoundError")
def _():
    try:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    except openai.NotFoundError as e:
        assert e.code == "model_not_found", e
    else:
        raise AssertionError("no error")


@check("fourth call in a minute -> RateLimitError")
def _():
    try:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    except openai.RateLimitError as e:
        assert e.code == "rate_limit_exceeded", e
        assert int(e.response.headers["retry-after"]) >= 1
    else:
        raise AssertionError("no error")


passed = failed = 0
for name, fn in checks:
    try:
        fn()
        passed += 1
        print(f"ok   {name}")
    except Exception as e:  # noqa: BLE001 - report every failing check
        failed += 1
        print(f"FAIL {name}: {e!r}")
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
