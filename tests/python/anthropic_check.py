"""Drives keypool's Anthropic Messages surface with the official `anthropic` SDK.
Run by tests/e2e/anthropic.rs, on `/v1` and on a named gateway.

Environment: KEYPOOL_BASE_URL (the root Anthropic's SDK appends /v1/messages to) and
KEYPOOL_TOKEN (sent as x-api-key, as the SDK and Claude Code do).
"""

import os
import sys

import anthropic
from anthropic import Anthropic

BASE = os.environ["KEYPOOL_BASE_URL"]
client = Anthropic(base_url=BASE, api_key=os.environ["KEYPOOL_TOKEN"], max_retries=0)
MODEL = "claude-sonnet-4-5"
MESSAGES = [{"role": "user", "content": "Hello there friend"}]
checks = []


def check(name):
    def wrap(fn):
        checks.append((name, fn))
        return fn
    return wrap


@check("messages.create")
def _():
    m = client.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)
    assert m.content[0].text.startswith("Hello from"), m
    # "Hello there friend" = 3 words + 2; five words back
    assert (m.usage.input_tokens, m.usage.output_tokens) == (5, 5), m.usage


@check("cache_control passes untouched; cache reads reported")
def _():
    m = client.messages.create(
        model=MODEL, max_tokens=64,
        system=[{"type": "text", "text": "Be brief", "cache_control": {"type": "ephemeral"}}],
        messages=MESSAGES)
    assert m.usage.cache_read_input_tokens == 1024, m.usage


@check("messages.stream")
def _():
    with client.messages.stream(model=MODEL, max_tokens=64, messages=MESSAGES) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text.startswith("Hello from"), text
    assert final.usage.output_tokens == 5, final.usage


@check("messages.count_tokens")
def _():
    n = client.messages.count_tokens(model=MODEL, messages=MESSAGES)
    assert n.input_tokens == 5, n


@check("tool use")
def _():
    m = client.messages.create(
        model=MODEL, max_tokens=64, messages=MESSAGES,
        tools=[{"name": "get_weather", "description": "Weather",
                "input_schema": {"type": "object", "properties": {}}}])
    assert m.stop_reason == "tool_use", m
    assert m.content[0].type == "tool_use" and m.content[0].name == "get_weather", m


@check("wrong key -> AuthenticationError")
def _():
    bad = Anthropic(base_url=BASE, api_key="not-a-keypool-token", max_retries=0)
    try:
        bad.messages.create(model=MODEL, max_tokens=8, messages=MESSAGES)
    except anthropic.AuthenticationError as e:
        assert e.body["error"]["type"] == "authentication_error", e.body
    else:
        raise AssertionError("no error")


if os.environ.get("KEYPOOL_LIMITED"):
    @check("the gateway's rate limit -> RateLimitError")
    def _():
        for _ in range(10):
            try:
                client.messages.create(model=MODEL, max_tokens=8, messages=MESSAGES)
            except anthropic.RateLimitError as e:
                assert e.body["error"]["type"] == "rate_limit_error", e.body
                assert int(e.response.headers["retry-after"]) >= 1
                return
        raise AssertionError("never limited")


failed = 0
for name, fn in checks:
    try:
        fn()
        print(f"ok   {name}")
    except Exception as e:  # noqa: BLE001 - every failure is reported
        failed += 1
        print(f"FAIL {name}: {type(e).__name__}: {e}")
sys.exit(1 if failed else 0)
