"""Chat completions <-> Messages translation through keypool, with both official SDKs.
Run by tests/e2e/translate.rs: `claude-sonnet-4-5` is served only by an Anthropic key,
`gpt-4o-mini` only by an OpenAI key.

Environment: KEYPOOL_BASE_URL (the root, no /v1), KEYPOOL_TOKEN.
"""

import json
import os
import sys

from anthropic import Anthropic
from openai import OpenAI

root = os.environ["KEYPOOL_BASE_URL"]
token = os.environ["KEYPOOL_TOKEN"]
oa = OpenAI(base_url=root + "/v1", api_key=token, max_retries=0)
an = Anthropic(base_url=root, api_key=token, max_retries=0)
HELLO = [{"role": "user", "content": "Hello there friend"}]
TOOL = {"name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}

# the openai SDK asking for a Claude model
r = oa.chat.completions.create(model="claude-sonnet-4-5", messages=[
    {"role": "system", "content": "Be brief"}] + HELLO)
assert r.choices[0].message.content.startswith("Hello from claude"), r
assert r.choices[0].finish_reason == "stop", r
# Anthropic counts: system 2 + message 3 + 2
assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (7, 5), r.usage
print("openai -> anthropic", r.choices[0].message.content, r.usage)

text, usage = "", None
for chunk in oa.chat.completions.create(model="claude-sonnet-4-5", messages=HELLO, stream=True,
                                        stream_options={"include_usage": True}):
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
    if chunk.usage:
        usage = chunk.usage
assert text.startswith("Hello from claude"), text
assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (5, 5), usage
print("openai -> anthropic, streamed", text, usage)

r = oa.chat.completions.create(model="claude-sonnet-4-5", messages=HELLO,
                               tools=[{"type": "function", "function": TOOL}])
call = r.choices[0].message.tool_calls[0]
assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {}, r
assert r.choices[0].finish_reason == "tool_calls", r
print("openai -> anthropic, tool call", call)

# the anthropic SDK asking for a GPT model
m = an.messages.create(model="gpt-4o-mini", max_tokens=64, system="Be brief", messages=HELLO)
assert m.content[0].text.startswith("Hello from gpt"), m
assert m.stop_reason == "end_turn", m
# OpenAI counts: system 2 + 2, message 3 + 2
assert (m.usage.input_tokens, m.usage.output_tokens) == (9, 5), m.usage
print("anthropic -> openai", m.content[0].text, m.usage)

with an.messages.stream(model="gpt-4o-mini", max_tokens=64, messages=HELLO) as stream:
    streamed = "".join(stream.text_stream)
    final = stream.get_final_message()
assert streamed.startswith("Hello from gpt"), streamed
assert final.usage.output_tokens == 5 and final.usage.input_tokens == 5, final.usage
print("anthropic -> openai, streamed", streamed, final.usage)

m = an.messages.create(model="gpt-4o-mini", max_tokens=64, messages=HELLO, tools=[
    {"name": TOOL["name"], "description": TOOL["description"], "input_schema": TOOL["parameters"]}])
assert m.stop_reason == "tool_use" and m.content[0].type == "tool_use", m
assert m.content[0].name == "get_weather" and m.content[0].input == {}, m
print("anthropic -> openai, tool use", m.content[0])
print("ok")
sys.exit(0)
