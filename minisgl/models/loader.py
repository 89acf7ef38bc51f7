"""Build a CausalLM and fill it from a checkpoint (safetensors, single or sharded, or GGUF) or
randomly."""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from minisgl.distributed.group import TPGroup
from minisgl.layers.embedding import VocabShard
from minisgl.layers.linear import MergedLinear
from minisgl.layers.moe import EXPERT_PROJECTIONS, Experts
from minisgl.models.config import ModelConfig
from minisgl.models.decoder import CausalLM
from minisgl.models.errors import ModelLoadError
from minisgl.models.source import ModelSource, checkpoint_files

log = logging.getLogger(__name__)

# Checkpoint sub-module name -> (our fused module name, part index).
_STACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
# Tensors some checkpoints carry that the model recomputes.
# KV-cache scales are read by the ModelRunner (`checkpoint_kv_scales`), not loaded here.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "k_scale", "v_scale", "kv_scale")
# One expert's projection in a checkpoint: `<layer>.mlp.experts.<e>.<gate|up|down>_proj.weight`
# (Mixtral's names are rewritten to these by _canonical_name first).
_EXPERT_TENSOR = re.compile(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_MIXTRAL_EXPERT = re.compile(r"\.block_sparse_moe\.(?:experts\.(\d+)\.(w[123])\.)?")
_MIXTRAL_PROJECTIONS = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def _canonical_name(name: str) -> str:
    """Mixtral's `block_sparse_moe` (router `gate`, experts' w1/w3/w2 = gate/up/down) under the
    names Qwen3-MoE uses, `mlp.gate` and `mlp.experts.<e>.<gate|up|down>_proj`."""

    def sub(m: re.Match[str]) -> str:
        if m.group(1) is None:
            return ".mlp."
        return f".mlp.experts.{m.group(1)}.{_MIXTRAL_PROJECTIONS[m.group(2)]}."

    return _MIXTRAL_EXPERT.sub(sub, name) if ".block_sparse_moe." in name else name


def build_model(
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    tp: TPGroup | None = None,
    fused: bool = True,
) -> CausalLM:
    """An uninitialised model of `cfg` (this rank's shard of it) on `device`; `fused`: its
    layers use the fused Triton kernels on the GPU.

    Parameters are created in `dtype` directly (rotary tables are float32 by construction):
    building in float32 and casting would take twice the weights' memory at the peak and leave
    the float32 copies in the allocator's cache, where the KV-pool sizing counts them as used.
    """
    with torch.device(device), _default_dtype(dtype):
        model = CausalLM(cfg, max_positions, tp, fused)
    return model.eval()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's default floating dtype set to `dtype` for the block (restored on exit)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_weights(model: CausalLM, source: ModelSource, progress: bool = True) -> None:
    """Copy each checkpoint tensor of `source` (safetensors or GGUF; this rank's slice of it)
    into its (maybe fused) parameter; check shapes and coverage."""
    assert source.weights_dir is not None, "dummy weights have no checkpoint to load"
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    expected = _expected_tensors(model)
    loaded: set[str] = set()
    for path, name, read in _checkpoint_tensors(source, model.cfg, progress):
        name = _canonical_name(name)
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name not in expected:
            log.warning("%s: ignoring unexpected tensor %s", path.name, name)
            continue
        _copy_tensor(name, read(), params, modules, path)
        loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if model.cfg.tie_word_embeddings and "lm_head.weight" in missing:
        missing.remove("lm_head.weight")
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        where = source.gguf_file or source.weights_dir
        raise ModelLoadError(f"{where}: {len(missing)} tensors missing from checkpoint: {shown}")


TensorReader = Callable[[], torch.Tensor]


def _checkpoint_tensors(
    source: ModelSource, cfg: ModelConfig, progress: bool
) -> Iterator[tuple[Path, str, TensorReader]]:
    """(file, HF tensor name, a function reading the tensor) for every checkpoint tensor."""
    if source.gguf_file is not None:
        from minisgl.models.gguf import gguf_tensors

        path = source.gguf_file
        tensors = gguf_tensors(path, cfg)
        for name, tensor in tqdm(tensors, desc="Loading GGUF", unit="tensor", disable=not progress):
            yield path, name, _ready(tensor)
        return
    assert source.weights_dir is not None
    files = checkpoint_files(source.weights_dir)
    for path in tqdm(files, desc="Loading weights", unit="file", disable=not progress):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield path, name, functools.partial(f.get_tensor, name)
        except SafetensorError as e:
            raise ModelLoadError(f"{path}: cannot read safetensors file ({e})") from None


def _ready(tensor: torch.Tensor) -> TensorReader:
    return lambda: tensor


def _expected_tensors(model: CausalLM) -> dict[str, tuple[str, int | None]]:
    """Checkpoint tensor name -> (our parameter name, part index or None)."""
    out: dict[str, tuple[str, int | None]] = {}
    modules = dict(model.named_modules())
    for pname, _ in model.named_parameters(remove_duplicate=False):
        module_path, _, leaf = pname.rpartition(".")
        parent, _, last = module_path.rpartition(".")
        experts = modules.get(module_path)
        if isinstance(experts, Experts):  # stacked from one tensor per expert and projection
            for e in range(experts.num_experts):
                for ck, (ours, part) in EXPERT_PROJECTIONS.items():
                    if ours == leaf:
                        out[f"{module_path}.{e}.{ck}.weight"] = (pname, part)
            continue
        fused = [(ck, part) for ck, (ours, part) in _STACKED.items() if ours == last]
        if fused:
            for ck, part in fused:
                out[f"{parent}.{ck}.{leaf}"] = (pname, part)
        else:
            out[pname] = (pname, None)
    return out


def _copy_tensor(
    name: str,
    tensor: torch.Tensor,
    params: dict[str, torch.nn.Parameter],
    modules: dict[str, torch.nn.Module],
    path: Path,
) -> None:
    module_path, _, leaf = name.rpartition(".")
    parent, _, last = module_path.rpartition(".")
    expert = _EXPERT_TENSOR.fullmatch(name)
    if expert is not None:
        module = modules[expert.group(1)]
        assert isinstance(module, Experts)
        tensor = module.checkpoint_slice(tensor, expert.group(3))
        target = module.target(int(expert.group(2)), expert.group(3))
    elif last in _STACKED:
        ours, part = _STACKED[last]
        module = modules[f"{parent}.{ours}"]
        assert isinstance(module, MergedLinear)
        tensor = module.checkpoint_slice(tensor, part, leaf)
        target = getattr(module, leaf).data[module.shard_slice(part)]
    else:
        target = params[name].data
        module = modules[module_path]
        if isinstance(module, MergedLinear | VocabShard):
            tensor = module.checkpoint_slice(tensor, 0, leaf)
        if isinstance(module, VocabShard) and tensor.shape[0] < target.shape[0]:
            target[tensor.shape[0] :].zero_()  # the last rank's rows past the vocabulary
            target = target[: tensor.shape[0]]
    if tuple(tensor.shape) != tuple(target.shape):
        raise ModelLoadError(
            f"{path.name}: tensor {name} has shape {tuple(tensor.shape)}, "
            f"expected {tuple(target.shape)}"
        )
    target.copy_(tensor)


def init_dummy_weights(model: CausalLM, seed: int = 0) -> None:
    """Random weights (like `--load-format dummy` elsewhere): N(0, 0.02) matrices, unit norms."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        elif name.endswith("bias"):
            p.data.zero_()
        else:
            p.data.normal_(0.0, 0.02, generator=gen)
