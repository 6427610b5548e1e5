"""The simulated trace follows CUDA's autocast policy, not the CPU's, whatever device it runs on."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from service.schemas.spec import PlanSpec
from workers.engine import autocast_policy as ap
from workers.engine.compiled import compile_job
from workers.engine.devices import open_device, open_session, simulated

HEADER = Path(torch.__file__).parent / "include" / "ATen" / "autocast_mode.h"
MACROS = {
    "AT_FORALL_LOWER_PRECISION_FP": "lower_precision_fp",
    "AT_FORALL_FP32": "fp32",
    "AT_FORALL_FP32_SET_OPT_DTYPE": "fp32_set_opt_dtype",
    "AT_FORALL_PROMOTE": "promote",
}


def header_policy() -> dict[str, str]:
    """`_(op)` / `_(op, overload)` entries of the installed torch's autocast lists."""
    text = HEADER.read_text()
    out: dict[str, str] = {}
    for macro, policy in MACROS.items():
        body = re.search(rf"#define {macro}\(_\)(.*?)\n\n", text, re.S)
        assert body is not None, macro
        for name, overload in re.findall(r"_\((\w+)(?:,\s*(\w+))?\)", body.group(1)):
            out[f"{name}.{overload}" if overload else name] = policy
    return out


@pytest.mark.skipif(not HEADER.exists(), reason="torch installed without its headers")
def test_policy_table_is_the_installed_headers() -> None:
    from_header = header_policy()
    assert len(from_header) > 100
    for op, policy in from_header.items():
        assert ap.POLICY[op] == policy, op


def test_every_op_cuda_autocasts_has_a_rule() -> None:
    cuda_ops = set(ap.cuda_autocast_ops())
    assert cuda_ops, "this build registers no AutocastCUDA kernels"
    assert cuda_ops <= set(ap.POLICY)


class DtypeLog(TorchDispatchMode):
    """(aten op, output dtype) of every op below autocast."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        if isinstance(first, torch.Tensor):
            self.log.append((func._overloadpacket.__name__, first.dtype))
        return out

    def dtypes(self, op: str) -> set[torch.dtype]:
        return {d for name, d in self.log if name == op}


def _block_and_cnn(x_tokens: torch.Tensor, x_image: torch.Tensor) -> None:
    block = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, norm_first=True, dropout=0.0)
    h = block(x_tokens)
    F.log_softmax(nn.Linear(32, 10)(h), -1).sum().backward()
    conv = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Upsample(scale_factor=2)
    )
    y = conv(x_image)
    F.softmax(y.flatten(1), -1).sum().backward()


def _trace(policy: str) -> DtypeLog:
    torch.manual_seed(0)
    x_tokens, x_image = torch.randn(2, 5, 32), torch.randn(2, 3, 8, 8)
    log = DtypeLog()
    if policy == "cuda":
        with ap.cuda_autocast_on_cpu() as rules, ap.autocast_region(rules, torch.float16), log:
            _block_and_cnn(x_tokens, x_image)
    else:
        with torch.autocast("cpu", dtype=torch.float16), log:
            _block_and_cnn(x_tokens, x_image)
    return log


def test_transformer_block_and_cnn_follow_the_cuda_policy() -> None:
    log = _trace("cuda")
    for op in ("mm", "addmm", "bmm", "convolution"):  # lower_precision_fp: linear, matmul, conv
        if log.dtypes(op):
            assert log.dtypes(op) == {torch.float16}, op
    assert log.dtypes("convolution") and log.dtypes("addmm")
    for op in ("native_layer_norm", "native_group_norm", "_log_softmax", "_softmax"):  # fp32
        assert log.dtypes(op) == {torch.float32}, op
    assert log.dtypes("upsample_nearest2d") == {torch.float32}
    # the CPU policy leaves those in half precision: the test tells the two apart
    cpu = _trace("cpu")
    assert torch.float16 in cpu.dtypes("native_layer_norm") | cpu.dtypes("_softmax")


def test_weight_casts_are_cached_within_a_region() -> None:
    lin = nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with ap.cuda_autocast_on_cpu() as rules:
        with ap.autocast_region(rules, torch.bfloat16):
            lin(x)
            first = {k: id(v[1]) for k, v in rules.cache.entries.items()}
            lin(x)
            again = {k: id(v[1]) for k, v in rules.cache.entries.items()}
            assert len(first) == 2 and again == first  # weight and bias, cast once each
        assert not rules.cache.entries


def test_registrations_are_undone_on_exit() -> None:
    x = torch.randn(4, 8)
    with ap.cuda_autocast_on_cpu(), torch.autocast("cpu", dtype=torch.float16):
        assert F.softmax(x.half(), -1).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.float16):
        assert F.softmax(x.half(), -1).dtype == torch.float16


def test_binary_cross_entropy_is_refused_as_on_cuda() -> None:
    p, t = torch.rand(4), torch.rand(4)
    refused = pytest.raises(RuntimeError, match="unsafe to autocast")
    with ap.cuda_autocast_on_cpu() as rules, ap.autocast_region(rules, torch.float16), refused:
        F.binary_cross_entropy(p, t)


def test_simulated_transformer_keeps_fp32_norm_outputs_for_backward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a real GPU, bf16-mixed keeps LayerNorm and softmax outputs in fp32: a BERT-like
    encoder's activations are larger than the CPU policy would make them."""
    spec = PlanSpec.model_validate(
        {
            "model": {
                "source": "transformers",
                "architecture": "BertForSequenceClassification",
                "config": {
                    "hidden_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "intermediate_size": 128,
                    "vocab_size": 1000,
                    "attn_implementation": "eager",
                },
            },
            "data": {"kind": "tokens", "seq_len": 128, "num_classes": 2},
            "training": {"precision": "bf16-mixed", "optimizer": "adamw"},
            "device": {"kind": "simulated", "gpu": "A100-80GB"},
        }
    )

    def activations() -> int:
        job = compile_job(spec)
        device = open_device(job)
        with open_session(device, job) as session:
            return session.probe(16).breakdown["activations"]

    with_cuda_rules = activations()

    @contextmanager
    def cpu_rules() -> Iterator[None]:
        yield None  # no CUDA policy: the job falls back to torch.autocast("cpu")

    monkeypatch.setattr(simulated, "cuda_autocast_on_cpu", cpu_rules)
    assert with_cuda_rules > activations() * 1.03
