"""Resolve what the user named (a directory, a preset, nothing) into files to load."""

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

    def context_length(self, requested: int | None) -> int:
        """`requested` (--max-model-len) if given, never above the model's own limit."""
        limit = self.config.max_position_embeddings
        return min(requested or limit, limit)

    @property
    def has_text_tokenizer(self) -> bool:
        """Its own tokenizer, or the demo one that tokenizer_for falls back to."""
        if self.tokenizer_dir is not None:
            return True
        demo_vocab = load_json(DEMO_DIR / "config.json").get("vocab_size", 0)
        return isinstance(demo_vocab, int) and demo_vocab <= self.config.vocab_size


def preset_names() -> list[str]:
    """Names accepted by --model that map to the configs shipped in minisgl/models/presets."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def resolve_model(spec: str | None, dummy_weights: bool) -> ModelSource:
    """Find config, weights and tokenizer for `spec`; raise ModelLoadError if impossible."""
    if spec is None:
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
    if not path.is_dir():
        raise ModelLoadError(
            f"model {spec!r} is neither a checkpoint directory nor a preset "
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


def _read_config(path: Path) -> ModelConfig:
    return ModelConfig.from_dict(load_json(path), source=str(path))


def _merge_generation_eos(cfg: ModelConfig, eos: int | list[int] | None) -> ModelConfig:
    from dataclasses import replace

    extra = [eos] if isinstance(eos, int) else list(eos or [])
    merged = tuple(dict.fromkeys([*cfg.eos_token_ids, *extra]))
    return replace(cfg, eos_token_ids=merged)
