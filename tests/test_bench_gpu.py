"""`bench/gpu.py` on the CPU: its warm-up covers what it measures, its random model is alive."""

from __future__ import annotations

import argparse
import asyncio

import pytest
import torch
from transformers import T5Config, T5EncoderModel

from bench import gpu


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_bench_warm_up_compiles_everything_its_measured_requests_run(
    lora_rank: int, capsys: pytest.CaptureFixture[str]
) -> None:
    # The eager backend runs dynamo's capture as inductor does, in seconds on a CPU.
    torch._dynamo.reset()
    args = argparse.Namespace(
        tiny=True,
        model=None,
        device="cpu",
        size=64,
        steps=2,
        repeats=1,
        compile="on",
        compile_backend="eager",
        quantize="none",
        attention_backend=None,
        lora_rank=lora_rank,
        profile=bool(lora_rank),
    )
    result = asyncio.run(gpu.run(args))
    assert result["graphs_compiled_after_warmup"] == 0
    assert ("loras" in result) == bool(lora_rank)
    assert ("aten::" in result.get("profile", "")) == bool(lora_rank)
    # Each stage says so as it ends, so that a run cut off by a device's limit still tells.
    stages = capsys.readouterr().err
    assert "] built embedded (tiny) on cpu" in stages
    assert "] warmed up in" in stages and "] steady images timed" in stages
    assert ("] LoRA figures" in stages) == bool(lora_rank)
    # The split GroupNorm's decode is timed beside the default one and draws the same image.
    assert result["vae_decode_ms"]["split_group_norm"] > 0
    assert result["split_group_norm_psnr_db"] > 60


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_group_norm_is_group_norm(dtype: torch.dtype) -> None:
    norm = torch.nn.GroupNorm(8, 64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    norm = norm.to(dtype)
    # Off-centre activations, where E[x^2] - E[x]^2 would lose precision in low precision.
    x = (torch.randn(2, 64, 33, 17) * 3 + 5).to(dtype)
    expected = torch.nn.functional.group_norm(x, 8, norm.weight, norm.bias, norm.eps)
    tolerance = 1e-5 if dtype == torch.float32 else 0.07
    torch.testing.assert_close(gpu.split_group_norm(norm, x), expected, atol=tolerance, rtol=0)
    with gpu.group_norms_split(norm):
        torch.testing.assert_close(norm(x), expected, atol=tolerance, rtol=0)
    assert "forward" not in vars(norm)


def small_t5() -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, vocab_size=100)
    )


def test_random_weights_keep_norm_scales_so_t5_says_something() -> None:
    t5 = gpu._on_device(small_t5, torch.device("cpu"), torch.float32)
    output = t5(input_ids=torch.arange(10)[None]).last_hidden_state
    assert output.abs().mean() > 0.1


def test_random_weights_are_allocated_in_the_target_dtype_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    allocated: list[set[torch.dtype]] = []
    to_empty = torch.nn.Module.to_empty

    def recording(module: torch.nn.Module, **kwargs: object) -> torch.nn.Module:
        allocated.append({parameter.dtype for parameter in module.parameters()})
        return to_empty(module, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.nn.Module, "to_empty", recording)
    gpu._on_device(small_t5, torch.device("cpu"), torch.bfloat16)
    assert allocated == [{torch.bfloat16}]
