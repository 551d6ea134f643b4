"""MFU and device peaks, memory, cost, expert-load and bias summaries, the throughput window."""

import pytest
import torch

from train import metrics as M


@pytest.mark.parametrize("name, bf16, fp8", [
    ("NVIDIA H100 80GB HBM3", 989.0, 1979.0),  # SXM
    ("NVIDIA H100 PCIe", 756.0, 1513.0),
    ("NVIDIA H800", 989.0, 1979.0),
    ("NVIDIA H200", 989.0, 1979.0),  # not the H20's 148
    ("NVIDIA H20", 148.0, 296.0),
    ("NVIDIA GB200", 2500.0, 5000.0),  # not the B200's
    ("NVIDIA B200", 2250.0, 4500.0),
    ("NVIDIA A100-SXM4-80GB", 312.0, None),  # no FP8 tensor cores
    ("nvidia l40s", 362.0, 733.0),  # case-insensitive; not the L40's or L4's
    ("NVIDIA L4", 121.0, 242.5),
    ("NVIDIA RTX A4000", None, None),  # "A40" must not match inside "A4000"
    ("NVIDIA GeForce GTX 1080", None, None),
])
def test_peak_lookup_takes_the_most_specific_device_name(name, bf16, fp8):
    assert M.lookup_peak_tflops(name) == bf16
    assert M.lookup_peak_tflops(name, fp8=True) == fp8


def test_peak_is_none_on_cpu_unless_overridden():
    assert M.peak_tflops(torch.device("cpu")) is None
    assert M.peak_tflops("cpu", override=100.0) == 100.0
    with pytest.raises(ValueError, match="logging.peak_tflops=0"):
        M.peak_tflops("cpu", override=0.0)


def test_mfu_is_model_tflops_over_peak_and_null_without_a_peak():
    assert M.model_tflops(6e9, 1000.0) == pytest.approx(6.0)
    assert M.mfu(6e9, 1000.0, 12.0) == pytest.approx(0.5)
    assert M.mfu(6e9, 1000.0, None) is None
    assert M.mfu(6e9, None, 12.0) is None


def test_memory_stats_on_cpu_report_resident_set_and_its_peak():
    import mmap

    before = M.memory_stats("cpu")
    # 64 MiB of fresh anonymous pages, every page touched: an allocator cannot hand back memory
    # that an earlier test freed but kept resident (torch.ones could, and the RSS would not grow).
    block = mmap.mmap(-1, 64 * 2**20)
    for offset in range(0, len(block), 4096):
        block[offset] = 1
    after = M.memory_stats(torch.device("cpu"))
    assert set(after) == {"mem_rss_gib", "mem_peak_gib"}
    assert 0 < after["mem_rss_gib"] <= after["mem_peak_gib"] + 1e-9
    assert after["mem_rss_gib"] >= before["mem_rss_gib"] + 0.05  # saw the 64 MiB (0.0625 GiB)
    block.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_memory_stats_on_cuda_report_the_allocator():
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    s = M.memory_stats("cuda")
    assert {"mem_allocated_gib", "mem_reserved_gib", "mem_peak_gib", "mem_alloc_retries"} <= set(s)
    assert s["mem_allocated_gib"] >= 0.25 and s["mem_peak_gib"] >= s["mem_allocated_gib"]
    del x


def test_cost_matches_deepseek_v3s_table_and_projects_to_the_planned_tokens():
    # DeepSeek-V3 pre-training: 2664K H800 GPU-hours × $2 = $5.328M, on 2048 GPUs.
    elapsed = 2_664_000 / 2048 * 3600
    c = M.gpu_hours_and_cost(elapsed, 2048, 2.0, tokens_done=14_800, tokens_total=14_800)
    assert c["gpu_hours"] == pytest.approx(2_664_000) and c["cost_usd"] == pytest.approx(5_328_000)
    half = M.gpu_hours_and_cost(3600, 8, 2.0, tokens_done=100, tokens_total=400)
    assert half["gpu_hours"] == 8 and half["cost_usd"] == 16
    assert half["projected_gpu_hours"] == 32 and half["projected_cost_usd"] == 64
    none = M.gpu_hours_and_cost(10, 1, 2.0, tokens_done=0, tokens_total=400)
    assert none["projected_gpu_hours"] is None and none["projected_cost_usd"] is None


def test_expert_load_summary_per_layer_and_means():
    load = torch.tensor([[10, 10, 10, 10], [40, 0, 0, 0], [0, 0, 0, 0]])  # balanced, one expert, no tokens
    s = M.expert_load_summary(load)
    assert s["expert_load_max_over_mean_per_layer"] == [1.0, 4.0, 0.0]
    assert s["expert_load_cv_per_layer"][0] == 0.0
    assert s["expert_load_cv_per_layer"][1] == pytest.approx(3 ** 0.5)  # std [4,0,0,0] = √3
    assert s["expert_load_max_over_mean"] == pytest.approx(5 / 3)
    assert s["expert_load_min_over_mean"] == pytest.approx(1 / 3)
    assert s["expert_load"] == [[1.0] * 4, [4.0, 0.0, 0.0, 0.0], [0.0] * 4]
    assert M.expert_load_summary(torch.tensor([[1, 2]]))["expert_load"] == [[0.667, 1.333]]  # 3 decimals
    assert M.expert_load_summary(torch.zeros(0, 0)) == {}
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        M.expert_load_summary(torch.ones(4))


def test_bias_summary():
    b = M.bias_summary(torch.tensor([[-1.0, 1.0], [0.5, -0.5]]))
    assert b == pytest.approx({"expert_bias_mean": 0.0, "expert_bias_std": (0.625) ** 0.5,
                               "expert_bias_min": -1.0, "expert_bias_max": 1.0})
    assert M.bias_summary(torch.zeros(0)) == {}


def test_throughput_windows_skip_the_warmup_step():
    t = M.Throughput()
    t.update(100, now=10.0)  # first step: compile and warm-up, not counted
    assert t.rate() is None and t.overall() is None
    t.update(100, now=12.0)
    t.update(100, now=13.0)
    assert t.rate() == pytest.approx(200 / 3)  # 200 tokens in the 3 s after the first step
    assert t.rate() is None  # nothing new since
    t.update(300, now=14.0)
    assert t.rate() == pytest.approx(300.0)  # the new window only
    assert t.overall() == pytest.approx(500 / 4)


def test_throughput_uses_the_clock_by_default():
    t = M.Throughput()
    t.update(10)
    t.update(10)
    assert t.last >= t.first and t.total == 10
