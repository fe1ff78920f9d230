"""Drives keypool's Responses API surface with the official `openai` SDK.
Run by tests/e2e/responses.rs.

Environment: KEYPOOL_BASE_URL (`.../v1`), KEYPOOL_TOKEN; RETRIEVE_BASE_URL, when set, is
another replica that must find the responses created here.
"""

import os
import sys

from openai import OpenAI

client = OpenAI(base_url=os.environ["KEYPOOL_BASE_URL"], api_key=os.environ["KEYPOOL_TOKEN"], max_retries=0)
other = OpenAI(base_url=os.environ.get("RETRIEVE_BASE_URL", os.environ["KEYPOOL_BASE_URL"]),
               api_key=os.environ["KEYPOOL_TOKEN"], max_retries=0)

r = client.responses.create(model="gpt-4o-mini", input="Hello there friend")
assert r.id.startswith("resp_"), r.id
assert r.output_text.startswith("Hello from"), r.output_text
assert r.usage.input_tokens == 3 and r.usage.output_tokens == 5, r.usage
print("responses.create", r.id, r.output_text)

# a follow-up on the same key, through `previous_response_id`
r2 = client.responses.create(model="gpt-4o-mini", input="And again", previous_response_id=r.id)
print("previous_response_id", r2.id)

deltas, completed = [], None
with client.responses.create(model="gpt-4o-mini", input="Stream it", stream=True) as stream:
    for event in stream:
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        elif event.type == "response.completed":
            completed = event.response
assert completed is not None, "no response.completed"
assert "".join(deltas) == completed.output_text, (deltas, completed.output_text)
assert completed.usage.input_tokens == 2, completed.usage
print("responses.create(stream=True)", completed.id, "".join(deltas))

# retrieval (possibly through another replica) reaches the key that created each
for created in (r, r2, completed):
    got = other.responses.retrieve(created.id)
    assert got.id == created.id and got.output_text == created.output_text, got
items = other.responses.input_items.list(r.id)
assert items.data[0].content[0].text == "Hello there friend", items
deleted = other.responses.delete(r2.id)
print("responses.retrieve / input_items / delete", deleted)
print("ok")
sys.exit(0)
