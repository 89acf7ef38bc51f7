"""The tokenizer bundle of sglang's GetTokenizer: the model's Hugging Face tokenizer files as
one zip, so that smg builds its tokenizer and chat template from the worker itself.

A GGUF checkpoint carries its tokenizer inside the .gguf file; transformers rebuilds it from
there and writes the usual files, in a child process (the frontend never imports torch or
transformers), once, the first time a bundle is asked for.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from minisgl.models.source import DEMO_DIR, ModelSource

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.json",
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
)
"""The files of a Hugging Face tokenizer directory that the bundle holds (those present)."""
EXPORT_TIMEOUT_S = 300.0
"""Longest the child that writes a GGUF checkpoint's tokenizer files may take."""
_EXPORT = (
    "import sys; from pathlib import Path; "
    "from minisgl.tokenizer.tokenizer import load_tokenizer; "
    "load_tokenizer(Path(sys.argv[1])).save_pretrained(sys.argv[2])"
)


@dataclass(frozen=True)
class Bundle:
    data: bytes
    sha256: str
    """Hex digest of `data`."""


def tokenizer_source(source: ModelSource, override: str | None) -> Path | None:
    """What the tokenizer worker loads (--tokenizer, or the model's own: a directory or a
    .gguf file; the demo tokenizer for a preset); None: no tokenizer (token-id prompts)."""
    if override is not None:
        return Path(override)
    if source.gguf_file is not None:
        return source.gguf_file
    if source.tokenizer_dir is not None:
        return source.tokenizer_dir
    return DEMO_DIR if source.has_text_tokenizer else None


async def build_bundle(path: Path) -> Bundle:
    """The bundle of a tokenizer directory or .gguf file; OSError / RuntimeError if it
    cannot be made."""
    if path.is_dir():
        return await asyncio.to_thread(_zip, path)
    with tempfile.TemporaryDirectory(prefix="minisgl-tokenizer-") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _EXPORT,
            str(path),
            out,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), EXPORT_TIMEOUT_S)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"{path}: writing its tokenizer files took too long") from None
        if proc.returncode != 0:
            last = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"{path}: cannot write its tokenizer files ({last[0]})")
        return await asyncio.to_thread(_zip, Path(out))


def _zip(directory: Path) -> Bundle:
    names = [n for n in TOKENIZER_FILES if (directory / n).is_file()]
    if not names:
        raise FileNotFoundError(f"{directory}: no tokenizer files")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in names:
            zf.write(directory / name, name)
    data = buf.getvalue()
    return Bundle(data, hashlib.sha256(data).hexdigest())
