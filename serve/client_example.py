"""Chat, streaming with canvas previews, and infilling against ``dgemma serve`` with the openai client."""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    args = p.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="unused")
    model = client.models.list().data[0].id

    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello!"}],
                                           max_tokens=128, seed=0, extra_body={"max_denoising_steps": 32})
    print("chat:", reply.choices[0].message.content)
    print("usage:", reply.usage)

    print("stream:", end=" ")
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Count to five."}],
                                                max_tokens=128, stream=True, extra_body={"preview": True}):
        preview = (chunk.model_extra or {}).get("preview")
        if preview:
            print(f"\n  [canvas {preview['canvas']} step {preview['step']}] {preview['text'][:60]!r}", end="")
        elif chunk.choices and chunk.choices[0].delta.content:
            print("\n  committed:", repr(chunk.choices[0].delta.content), end="")
    print()

    middle = client.completions.create(model=model, prompt="def add(a, b):\n", suffix="\n    return c", max_tokens=16)
    print("infill:", repr(middle.choices[0].text))


if __name__ == "__main__":
    main()
