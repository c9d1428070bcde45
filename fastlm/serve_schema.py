"""The JSON bodies fastlm.serve's POST endpoints read, as OpenAPI schemas.

The handlers parse their bodies themselves (so every bad field gets OpenAI's error shape and a
message naming it); these schemas publish the same fields in the server's OpenAPI document
(/openapi.json, /docs), where clients and the schemathesis fuzz test read them. Ranges are
checked by the handlers, not here, so the fuzz also sends values they must refuse.
"""
from __future__ import annotations

_STRINGS = {"type": "array", "items": {"type": "string"}}
_IDS = {"type": "array", "items": {"type": "integer"}}

SAMPLING = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer"},
    "max_completion_tokens": {"type": "integer"},
    "temperature": {"type": "number"},
    "top_p": {"type": "number"},
    "top_k": {"type": "integer"},
    "min_p": {"type": "number"},
    "repetition_penalty": {"type": "number"},
    "seed": {"type": "integer"},
    "n": {"type": "integer"},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "stop": {"anyOf": [{"type": "string"}, _STRINGS]},
}

COMPLETION = {
    **SAMPLING,
    # a string, token ids, or a list of either (one choice per prompt)
    "prompt": {"anyOf": [{"type": "string"}, _IDS, _STRINGS,
                         {"type": "array", "items": _IDS}]},
    "echo": {"type": "boolean"},
    "logprobs": {"type": "integer"},
}

MESSAGE = {"type": "object", "required": ["role", "content"],
           "properties": {"role": {"type": "string", "enum": ["system", "user", "assistant"]},
                          "content": {"type": "string"}}}

CHAT = {
    **SAMPLING,
    "messages": {"type": "array", "items": MESSAGE},
    "logprobs": {"type": "boolean"},
    "top_logprobs": {"type": "integer"},
}


def request_body(properties: dict, required: str) -> dict:
    """FastAPI's openapi_extra for a route whose JSON body has these fields."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "properties": properties, "required": [required]}}}}}


COMPLETION_BODY = request_body(COMPLETION, "prompt")
CHAT_BODY = request_body(CHAT, "messages")
