"""Lists models with the official `openai` SDK (`client.models.list()`, `models.retrieve`).
Run by tests/e2e/python_sdk.rs, which checks what it prints.

Environment: KEYPOOL_BASE_URL (ending in /v1), KEYPOOL_TOKEN, and KEYPOOL_RETRIEVE (a model id
to retrieve; prints `retrieved ID` or `not found ID`).
"""

import json
import os

import openai
from openai import OpenAI

client = OpenAI(base_url=os.environ["KEYPOOL_BASE_URL"], api_key=os.environ["KEYPOOL_TOKEN"],
                max_retries=0)
page = client.models.list()
print("models", json.dumps(sorted(m.id for m in page)))
wanted = os.environ.get("KEYPOOL_RETRIEVE")
if wanted:
    try:
        m = client.models.retrieve(wanted)
        print("retrieved", m.id)
    except openai.NotFoundError:
        print("not found", wanted)
