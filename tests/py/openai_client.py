"""The official `openai` Python package against `ggmerge serve` (argv[1]: the base URL, …/v1):
models.list(), a chat completion, a streamed one with usage, a text completion, and a mixture
through extra_body. Exits non-zero (an assertion) on any mismatch."""
import sys

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key="unused")

ids = [m.id for m in client.models.list()]
assert ids[:3] == ["base", "math", "code"], ids
print("models:", ids)

q = [{"role": "user", "content": "What is the capital of France?"}]
r = client.chat.completions.create(model="math", messages=q, max_tokens=12, temperature=0)
whole = r.choices[0].message.content
assert whole and r.choices[0].finish_reason in ("stop", "length"), r
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage
print("chat:", repr(whole), r.usage)

parts, usage = [], None
stream = client.chat.completions.create(
    model="math", messages=q, max_tokens=12, temperature=0, stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            parts.append(c.delta.content)
assert "".join(parts) == whole, (parts, whole)
assert usage is not None and usage.completion_tokens == r.usage.completion_tokens, usage
print("streamed: same text,", usage)

c = client.completions.create(model="code", prompt="The capital of France is", max_tokens=8, temperature=0)
assert c.choices[0].text, c
print("completion:", repr(c.choices[0].text))

mix = client.chat.completions.create(
    model="custom", messages=q, max_tokens=12, temperature=0,
    extra_body={"experts": {"math": 0.6, "code": 0.4}, "merge_method": "dare_ties"},
)
extra = mix.model_extra["ggmerge"]
assert extra["mixture"] == {"math": 0.6, "code": 0.4}, extra
assert extra["merge_method"] == "dare_ties", extra
print("extra_body mixture:", repr(mix.choices[0].message.content), extra)

try:
    client.chat.completions.create(model="gpt-4", messages=q)
    raise SystemExit("an unknown model must fail")
except Exception as e:  # openai.NotFoundError
    assert getattr(e, "status_code", None) == 404, e
    print("unknown model: 404")
