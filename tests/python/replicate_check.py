"""Drives Replicate-backed models through keypool with the official `openai` SDK.

Run by tests/e2e/replicate.rs, which configures (lb_policy: order):
  rep-ok   (Replicate, succeeds)     serves mistralai/mixtral-8x7b-instruct-v0.1
  rep-fail (Replicate, fails)        serves meta/meta-llama-3-8b-instruct, before oai
  rep-429  (Replicate, 429 + 5 s)    serves mistralai/mistral-7b-instruct-v0.2, before oai
  oai      (OpenAI mock)             serves both of the last two
"""

import os
import sys

import openai
from openai import OpenAI

client = OpenAI(base_url=os.environ["KEYPOOL_BASE_URL"], api_key=os.environ["KEYPOOL_TOKEN"], max_retries=0)
MIXTRAL = "mistralai/mixtral-8x7b-instruct-v0.1"
MESSAGES = [{"role": "user", "content": "Hello there friend"}]
REPLY = "Hello from replicate\nsecond line"
checks = []


def check(fn):
    checks.append(fn)
    return fn


@check
def plain_chat_served_by_replicate():
    raw = client.chat.completions.with_raw_response.create(model=MIXTRAL, messages=MESSAGES, max_tokens=32)
    assert raw.headers["x-keypool-upstream"] == "rep-ok", raw.headers
    r = raw.parse()
    assert r.choices[0].message.content == REPLY, r
    assert r.choices[0].finish_reason == "stop"
    # prompt "<s>[INST] Hello there friend [/INST]": 5 tokens by the stand-in's count; 4 pieces out
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 4, 9), r.usage


@check
def streamed_chat_served_by_replicate():
    chunks = list(client.chat.completions.create(model=MIXTRAL, messages=MESSAGES, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY, repr(text)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks), "usage chunk leaked"
    assert len({c.id for c in chunks}) == 1


@check
def streamed_chat_with_usage():
    chunks = list(client.chat.completions.create(
        model=MIXTRAL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    u = chunks[-1].usage
    assert u is not None and (u.prompt_tokens, u.completion_tokens) == (5, 4), chunks[-1]


@check
def failed_prediction_fails_over_to_openai():
    raw = client.chat.completions.with_raw_response.create(model="meta/meta-llama-3-8b-instruct", messages=MESSAGES)
    assert raw.headers["x-keypool-upstream"] == "oai", raw.headers
    assert raw.parse().choices[0].message.content == "Hello from oai the mock"


@check
def a_429_cools_the_replicate_key():
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(
            model="mistralai/mistral-7b-instruct-v0.2", messages=MESSAGES)
        assert raw.headers["x-keypool-upstream"] == "oai", raw.headers


@check
def unsupported_parameters_are_refused():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    for kwargs in ({"tools": tools}, {"n": 2}):
        try:
            client.chat.completions.create(model=MIXTRAL, messages=MESSAGES, **kwargs)
        except openai.BadRequestError as e:
            assert e.status_code == 400, e
        else:
            raise AssertionError(f"no BadRequestError for {kwargs}")


failed = 0
for fn in checks:
    try:
        fn()
        print(f"ok    {fn.__name__}")
    except Exception as e:  # noqa: BLE001 - report every failing check
        failed += 1
        print(f"FAIL  {fn.__name__}: {type(e).__name__}: {e}")
print(f"{len(checks) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
