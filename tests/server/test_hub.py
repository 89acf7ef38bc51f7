"""Hugging Face hub ids, offline: a hub cache in a temporary HF_HOME, laid out as huggingface_hub
writes it (models--owner--name/{blobs, snapshots/<commit>, refs/<name>}), read with
HF_HUB_OFFLINE=1 by real `minisgl generate` and `minisgl serve` processes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from minisgl import LLM, SamplingParams
from minisgl.models.errors import ModelLoadError
from minisgl.models.hub import is_hub_id, weight_patterns
from minisgl.models.source import resolve_model
from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.cli_runs import CliRuns
from tests.helpers.server_util import run_server

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120
REPO = "minisgl-test/tiny"
MAIN = "1" * 40  # the commit refs/main points at
V2 = "2" * 40  # the commit of tag v2: other weights
CONFIG_ONLY = "minisgl-test/config-only"
PROMPTS = ["Hello", "Once upon a time"]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
GEN_FLAGS = ("--max-new-tokens", "4", "--ignore-eos", "--json", "--num-pages", "16")


def add_snapshot(hf_home: Path, repo_id: str, commit: str, files: Path, refs: list[str]) -> None:
    """Put the files of `files` into the hub cache as snapshot `commit` of `repo_id`: content in
    blobs/ (named by hash), symlinks in snapshots/<commit>/, refs/<ref> holding the commit."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(files.iterdir()):
        data = f.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", digest))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)


@dataclass
class Hub:
    home: Path
    checkpoints: dict[str, Path]  # commit -> the checkpoint directory it was made from

    def env(self) -> dict[str, str]:
        return {"HF_HOME": str(self.home), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Hub:
    base = tmp_path_factory.mktemp("hub")
    home = base / "hf_home"
    main = make_checkpoint(base / "main", seed=0)
    v2 = make_checkpoint(base / "v2", seed=1)
    add_snapshot(home, REPO, MAIN, main, ["main"])
    add_snapshot(home, REPO, V2, v2, ["v2"])
    config_only = base / "config-only"
    config_only.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (config_only / name).write_bytes((main / name).read_bytes())
    add_snapshot(home, CONFIG_ONLY, MAIN, config_only, ["main"])
    return Hub(home, {MAIN: main, V2: v2})


@pytest.fixture(scope="module")
def runs(hub: Hub) -> Iterator[CliRuns]:
    r = CliRuns(hub.env(), extra_args=("--no-progress",))
    r.start("main", "generate", *PROMPTS, "--model", REPO, *GEN_FLAGS)
    r.start("tag", "generate", *PROMPTS, "--model", REPO, "--revision", "v2", *GEN_FLAGS)
    r.start("commit", "generate", *PROMPTS, "--model", REPO, "--revision", V2, *GEN_FLAGS)
    r.start("absent", "generate", "Hello", "--model", "minisgl-test/absent")
    r.start("no-rev", "generate", "Hello", "--model", REPO, "--revision", "no-such-branch")
    r.start("no-weights", "generate", "Hello", "--model", CONFIG_ONLY)
    r.start("dummy", "generate", *PROMPTS, "--model", CONFIG_ONLY, "--dummy-weights", *GEN_FLAGS)
    yield r
    r.close()


def direct(path: Path, dummy_weights: bool = False) -> list[dict[str, Any]]:
    """What the same prompts give when the checkpoint directory is loaded directly."""
    llm = LLM(str(path), progress=False, num_pages=16, dummy_weights=dummy_weights)
    outs = llm.generate(PROMPTS, GREEDY)
    return [
        {"prompt": p, "text": o.text, "token_ids": o.token_ids}
        for p, o in zip(PROMPTS, outs, strict=True)
    ]


def answers(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: r[k] for k in ("prompt", "text", "token_ids")} for r in records]


def test_hub_id_generates_like_its_directory(hub: Hub, runs: CliRuns) -> None:
    assert answers(runs["main"].records()) == direct(hub.checkpoints[MAIN])


def test_revision_selects_a_snapshot_by_tag_or_commit(hub: Hub, runs: CliRuns) -> None:
    want = direct(hub.checkpoints[V2])
    assert want != direct(hub.checkpoints[MAIN])  # the two snapshots really differ
    assert answers(runs["tag"].records()) == want
    assert answers(runs["commit"].records()) == want


def test_id_absent_from_the_cache_is_a_one_line_error(runs: CliRuns) -> None:
    line = runs["absent"].error()
    assert "'minisgl-test/absent'" in line and "revision main" in line
    assert "HF_HUB_OFFLINE" in line and "cache" in line


def test_revision_absent_from_the_cache_names_it(runs: CliRuns) -> None:
    line = runs["no-rev"].error()
    assert f"'{REPO}'" in line and "revision no-such-branch" in line


def test_snapshot_without_weights_needs_dummy_weights(hub: Hub, runs: CliRuns) -> None:
    line = runs["no-weights"].error()
    assert f"'{CONFIG_ONLY}'" in line and "safetensors" in line
    records = runs["dummy"].records()
    assert [len(r["token_ids"]) for r in records] == [4, 4]
    assert answers(records) == direct(hub.checkpoints[MAIN] / "config.json", dummy_weights=True)


@pytest.mark.slow
def test_serve_a_hub_id_offline(hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in hub.env().items():
        monkeypatch.setenv(key, value)
    want = direct(hub.checkpoints[MAIN])
    with run_server(tmp_path, "--model", REPO, "--num-pages", "16") as server, server.client() as c:
        assert c.model_info().model == REPO
        for w in want:
            got = c.generate(w["prompt"], max_new_tokens=4, temperature=0.0, ignore_eos=True)
            assert (got.text, got.token_ids) == (w["text"], w["token_ids"])


@pytest.mark.parametrize(
    ("spec", "hub_id"),
    [
        ("Qwen/Qwen3-0.6B", True),
        ("meta-llama/Llama-3.1-8B-Instruct", True),
        ("owner/name_v1.5", True),
        ("qwen3-0.6b", False),  # a preset
        ("/abs/path", False),
        ("./rel/path", False),
        ("a/b/c", False),
        ("owner/model.gguf", False),  # a missing local file, not a repository
        ("owner/config.json", False),
        ("owner/..", False),
        ("own--er/name", False),
    ],
)
def test_what_reads_as_a_hub_id(spec: str, hub_id: bool) -> None:
    assert is_hub_id(spec) is hub_id


def test_weights_come_from_the_index_when_there_is_one(tmp_path: Path) -> None:
    assert weight_patterns(tmp_path) == ["*.safetensors"]
    shards = {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    assert weight_patterns(tmp_path) == sorted(shards.values())


def test_revision_of_a_local_model_is_an_error(hub: Hub) -> None:
    with pytest.raises(ModelLoadError, match="revision 'v2' applies to Hugging Face hub ids"):
        resolve_model(str(hub.checkpoints[MAIN]), False, revision="v2")
    with pytest.raises(ModelLoadError, match="minisgl-demo"):
        resolve_model(None, False, revision="v2")
