"""Hugging Face hub ids (`--model Qwen/Qwen3-0.6B`): the files we load, fetched into the HF cache.

huggingface_hub does the work and reads its own settings: HF_HOME / HF_HUB_CACHE (where the
cache is), HF_HUB_OFFLINE (cache only, no network), HF_TOKEN (private and gated repositories).
Only what minisgl reads is fetched: config, generation config, tokenizer files, and the
safetensors weights (the shards the index names when there is one; nothing with dummy weights).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from minisgl.models.errors import ModelLoadError

CONFIG_FILES = ["config.json", "generation_config.json"]
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
]
WEIGHTS_INDEX = "model.safetensors.index.json"

# owner/name as the hub spells repository ids (letters, digits, '-', '_', '.'), and not a file
# name we read ourselves (a missing local .json or .gguf should be reported as a missing file).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def is_hub_id(spec: str) -> bool:
    """Whether `spec` reads as a hub repository id (the caller checks it is no local path)."""
    return (
        _HUB_ID.fullmatch(spec) is not None
        and ".." not in spec
        and "--" not in spec
        and not spec.endswith((".json", ".gguf", ".safetensors"))
    )


def snapshot(repo_id: str, revision: str | None, dummy_weights: bool, progress: bool) -> Path:
    """The local snapshot directory of `repo_id` at `revision` (default main), downloading what
    is missing. Raises ModelLoadError with one line naming the id and revision."""
    rev = revision or "main"
    try:
        path = _download(repo_id, rev, [*CONFIG_FILES, *TOKENIZER_FILES, WEIGHTS_INDEX], progress)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{_named(repo_id, rev)}: the snapshot has no config.json")
        if not dummy_weights:
            # Pin the commit just resolved, so the weights match the config even if the branch
            # moves in between.
            path = _download(repo_id, path.name, weight_patterns(path), progress)
            if not any(path.glob("*.safetensors")):
                raise ModelLoadError(
                    f"{_named(repo_id, rev)}: the snapshot has no *.safetensors weights "
                    "(minisgl loads safetensors checkpoints and local .gguf files)"
                )
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"{_named(repo_id, rev)}: {_reason(e)}") from None
    return path


def _named(repo_id: str, revision: str) -> str:
    """How errors name the model: a user who meant a local directory learns there is none."""
    return f"model {repo_id!r} (no such local path; as a hub id, revision {revision})"


def weight_patterns(snapshot_dir: Path) -> list[str]:
    """The weight files to fetch: the shards named by the index when there is one (a repository
    may also hold a consolidated copy), else every *.safetensors file."""
    index = snapshot_dir / WEIGHTS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if isinstance(weight_map, dict) and weight_map:
            return sorted({str(f) for f in weight_map.values()})
    return ["*.safetensors"]


def _download(repo_id: str, revision: str, patterns: list[str], progress: bool) -> Path:
    from huggingface_hub import snapshot_download

    kwargs: dict[str, Any] = {} if progress else {"tqdm_class": _quiet_tqdm()}
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, **kwargs))


def _quiet_tqdm() -> Any:
    from tqdm.auto import tqdm

    class Quiet(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet


def _reason(e: Exception) -> str:
    """One line saying why a hub look-up failed."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, GatedRepoError):
        return "the repository is gated: accept its terms on huggingface.co and set HF_TOKEN"
    if isinstance(e, RepositoryNotFoundError):
        return "no such repository on the hub (or it is private: set HF_TOKEN)"
    if isinstance(e, RevisionNotFoundError):
        return "the repository has no such revision"
    if isinstance(e, LocalEntryNotFoundError):
        where = f"not in the local cache ({constants.HF_HUB_CACHE})"
        if constants.HF_HUB_OFFLINE:
            return f"{where} and downloads are off (HF_HUB_OFFLINE)"
        return f"{where} and the hub cannot be reached"
    first = str(e).strip().splitlines()
    return f"{type(e).__name__}: {first[0] if first else 'no details'}"
