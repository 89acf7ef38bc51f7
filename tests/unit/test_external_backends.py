"""The optional FlashInfer / FlashAttention 3 backends, as far as a CPU can check them: their
paged-cache index arithmetic, and how they are chosen (tests/gpu runs them when installed)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from minisgl.attention.external import PagedCSR
from minisgl.attention.registry import create_backend, resolve_backend
from minisgl.cli import build_parser
from minisgl.transfer import HostToDevice
from tests.helpers.attn_cases import make_case


@pytest.mark.parametrize(
    ("seq_lens", "extend_lens", "page_size"),
    [
        ([1, 17, 16, 40], [1, 1, 16, 3], 16),  # decodes, a full page, a partial last page
        ([5, 9, 33], [5, 2, 33], 4),
        ([7, 1, 12], [1, 1, 1], 1),
    ],
)
def test_paged_csr_lists_each_requests_pages_in_order(
    seq_lens: list[int], extend_lens: list[int], page_size: int
) -> None:
    case = make_case(
        seq_lens,
        extend_lens,
        page_size=page_size,
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=16,
        dtype=torch.float32,
    )
    b = case.batch
    csr = PagedCSR(b, HostToDevice())
    assert csr.qo_indptr == [0, *torch.tensor(extend_lens).cumsum(0).tolist()]
    assert csr.indices.dtype == torch.int32
    assert len(csr.indices) == csr.indptr[-1]
    for i, seq in enumerate(seq_lens):
        pages = math.ceil(seq / page_size)
        assert csr.indptr[i + 1] - csr.indptr[i] == pages
        want = b.page_table[b.req_rows[i], :pages]
        assert torch.equal(csr.indices[csr.indptr[i] : csr.indptr[i + 1]], want)
        assert 1 <= csr.last_page_len[i] <= page_size
        assert (pages - 1) * page_size + csr.last_page_len[i] == seq


def test_auto_never_picks_an_optional_backend() -> None:
    assert resolve_backend("auto", "cuda") in ("triton", "torch")
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("flashinfer", "cuda") == "flashinfer"


@pytest.mark.parametrize(
    ("name", "module"), [("flashinfer", "flashinfer"), ("fa3", "flash_attn_interface")]
)
def test_naming_a_backend_whose_library_is_missing_is_a_clear_error(name: str, module: str) -> None:
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here; tests/gpu/test_external_backends_gpu.py runs it")
    with pytest.raises(ValueError, match=f"{name}.*needs.*not importable"):
        create_backend(name, 0.1)


def test_cli_rejects_an_unknown_backend(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["generate", "hi", "--attention-backend", "flashattention"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
