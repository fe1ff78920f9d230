"""Drives keypool with the official `openai` SDK. Run by tests/e2e/python_sdk.rs.

Environment: KEYPOOL_BASE_URL (ending in /v1) and KEYPOOL_TOKEN.
Exits non-zero with the failing check's message.
"""

import io
import os
import sys
import wave

import openai
from openai import OpenAI

BASE = os.environ["KEYPOOL_BASE_URL"]
TOKEN = os.environ["KEYPOOL_TOKEN"]
client = OpenAI(base_url=BASE, api_key=TOKEN, max_retries=0)
MESSAGES = [{"role": "user", "content": "Hello there friend"}]
checks = []


def check(name):
    def wrap(fn):
        checks.append((name, fn))
        return fn
    return wrap


@check("chat")
def _():
    r = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert r.choices[0].message.content.startswith("Hello from"), r
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 5, r.usage
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    assert raw.headers.get("x-keypool-upstream", "").startswith("mock-"), raw.headers


@check("streamed chat, usage not asked")
def _():
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Hello from"), text
    assert all(c.usage is None for c in chunks), "the usage chunk keypool asked for leaked"


@check("streamed chat with include_usage")
def _():
    chunks = list(client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 10, chunks[-1]


@check("embeddings (SDK default base64)")
def _():
    e = client.embeddings.create(model="text-embedding-3-small", input=["one two", "three"])
    assert len(e.data) == 2 and len(e.data[0].embedding) == 8, e
    assert abs(e.data[0].embedding[1] - 0.125) < 1e-6, e.data[0].embedding
    assert e.usage.prompt_tokens == 3, e.usage


@check("models.list")
def _():
    ids = [m.id for m in client.models.list()]
    assert "gpt-4o-mini" in ids, ids


@check("audio.transcriptions.create")
def _():
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x00" * 800)
    t = client.audio.transcriptions.create(model="whisper-1", file=("hello.wav", buf.getvalue(), "audio/wav"))
    assert t.text.startswith("Hello from"), t


@check("upstream 400 raises BadRequestError")
def _():
    try:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, temperature=5)
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.code == "decimal_above_max_value", e
    else:
        raise AssertionError("no BadRequestError")


@check("wrong token raises AuthenticationError")
def _():
    bad = OpenAI(base_url=BASE, api_key="wrong-token", max_retries=0)
    try:
        bad.models.list()
    except openai.AuthenticationError as e:
        assert e.code == "invalid_api_key", e
    else:
        raise AssertionError("no AuthenticationError")


@check("unknown model raises NotFoundError")
def _():
    try:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    except openai.NotFoundError as e:
        assert e.code == "model_not_found", e
    else:
        raise AssertionError("no NotFoundError")


failed = 0
for name, fn in checks:
    try:
        fn()
        print(f"ok    {name}")
    except Exception as e:  # noqa: BLE001 - report every failing check
        failed += 1
        print(f"FAIL  {name}: {type(e).__name__}: {e}")
print(f"{len(checks) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
