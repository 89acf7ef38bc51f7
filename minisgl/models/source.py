"""Resolve what the user named (a directory, a GGUF file, a preset, nothing) into files to load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from minisgl.models.config import ModelConfig, load_json
from minisgl.models.errors import ModelLoadError

DEMO_DIR = Path(__file__).parent / "demo"
PRESETS_DIR = Path(__file__).parent / "presets"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's config, weights and tokenizer come from."""

    name: str
    config: ModelConfig
    weights_dir: Path | None  # None: dummy weights
    tokenizer_dir: Path | None  # None: no tokenizer of its own
    gguf_file: Path | None = None
    """A GGUF checkpoint: the file (in weights_dir / tokenizer_dir) holding the config, the
    weights and the tokenizer."""

    def context_length(self, requested: int | None) -> int:
        """`requested` (--max-model-len) if given, never above the model's own limit."""
        limit = self.config.max_position_embeddings
        return min(requested or limit, limit)

    def check_weights(self) -> None:
        """Raise ModelLoadError unless every weight file the loader will read is present.

        Cheap (no tensor is read) and torch-free, so `minisgl serve` checks it before it
        listens; the loader reads the same list.
        """
        if self.weights_dir is not None and self.gguf_file is not None:
            if not self.gguf_file.is_file():
                raise ModelLoadError(f"missing checkpoint file: {self.gguf_file}")
        elif self.weights_dir is not None:
            checkpoint_files(self.weights_dir)

    @property
    def has_text_tokenizer(self) -> bool:
        """Its own tokenizer, or the demo one that tokenizer_for falls back to."""
        if self.tokenizer_dir is not None:
            return True
        demo_vocab = load_json(DEMO_DIR / "config.json").get("vocab_size", 0)
        return isinstance(demo_vocab, int) and demo_vocab <= self.config.vocab_size


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index if sharded."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = load_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index}: missing or empty 'weight_map'")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{model_dir}: no *.safetensors files found")
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"missing checkpoint shard: {f}")
    return files


def preset_names() -> list[str]:
    """Names accepted by --model that map to the configs shipped in minisgl/models/presets."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def resolve_model(
    spec: str | None, dummy_weights: bool, revision: str | None = None, progress: bool = False
) -> ModelSource:
    """Find config, weights and tokenizer for `spec`; raise ModelLoadError if impossible.

    A hub id (owner/name, not a local path) is fetched into the HF cache at `revision`
    (`models/hub.py`; `progress` shows its download bars) and read from there like a directory.
    """
    hub_dir = _hub_snapshot(spec, revision, dummy_weights, progress)
    if hub_dir is not None:
        path, name = hub_dir, str(spec)
    elif spec is None:
        path, name = DEMO_DIR, "minisgl-demo"
    elif (PRESETS_DIR / f"{spec}.json").is_file() and not Path(spec).exists():
        if not dummy_weights:
            raise ModelLoadError(
                f"preset {spec!r} is a config without weights; add --dummy-weights "
                "or pass a checkpoint directory"
            )
        cfg_path = PRESETS_DIR / f"{spec}.json"
        return ModelSource(spec, _read_config(cfg_path), None, None)
    else:
        path, name = Path(spec), spec
    if path.is_file() and path.suffix == ".json":
        if not dummy_weights:
            raise ModelLoadError(f"{path} is a config file; add --dummy-weights to use it")
        return ModelSource(path.stem, _read_config(path), None, None)
    gguf_file = _gguf_checkpoint(path)
    if gguf_file is not None:
        from minisgl.models.gguf import gguf_config

        folder = gguf_file.parent
        weights = None if dummy_weights else folder
        return ModelSource(name, gguf_config(gguf_file), weights, folder, gguf_file)
    if not path.is_dir():
        raise ModelLoadError(
            f"model {spec!r} is neither a checkpoint directory, a .gguf file nor a preset "
            f"({', '.join(preset_names())})"
        )
    cfg = _read_config(path / "config.json")
    gen_path = path / "generation_config.json"
    if gen_path.is_file():
        cfg = _merge_generation_eos(cfg, load_json(gen_path).get("eos_token_id"))
    has_tokenizer = (path / "tokenizer.json").is_file() or (
        path / "tokenizer_config.json"
    ).is_file()
    return ModelSource(name, cfg, None if dummy_weights else path, path if has_tokenizer else None)


def _hub_snapshot(
    spec: str | None, revision: str | None, dummy_weights: bool, progress: bool
) -> Path | None:
    """The snapshot directory when `spec` is a hub id; None for anything else."""
    from minisgl.models import hub

    if spec is None or Path(spec).exists() or not hub.is_hub_id(spec):
        if revision is not None:
            raise ModelLoadError(
                f"revision {revision!r} applies to Hugging Face hub ids (owner/name), "
                f"not to model {spec or 'minisgl-demo'!r}"
            )
        return None
    return hub.snapshot(spec, revision, dummy_weights, progress)


def _gguf_checkpoint(path: Path) -> Path | None:
    """The GGUF file `path` names: a .gguf file, or a directory whose only checkpoint is one
    .gguf file (no safetensors); None for anything else."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise ModelLoadError(f"{path} holds several GGUF files ({names}); pass one of them")
    return files[0] if files else None


def _read_config(path: Path) -> ModelConfig:
    return ModelConfig.from_dict(load_json(path), source=str(path))


def _merge_generation_eos(cfg: ModelConfig, eos: int | list[int] | None) -> ModelConfig:
    from dataclasses import replace

    extra = [eos] if isinstance(eos, int) else list(eos or [])
    merged = tuple(dict.fromkeys([*cfg.eos_token_ids, *extra]))
    return replace(cfg, eos_token_ids=merged)
