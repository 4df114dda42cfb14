"""The environment: device, versions, and the ceilings the targets are read against."""

from __future__ import annotations

from .context import Ctx, Row, check


@check("info", 5)
def check_environment(ctx: Ctx) -> list[Row]:
    """Device, versions, and the two ceilings: device-to-device copy bandwidth, bf16 GEMM rate."""
    torch = ctx.torch
    n = (1 << 30) if not ctx.dry else (1 << 22)  # bytes per buffer
    src = torch.empty(n // 4, dtype=torch.float32, device=ctx.device).uniform_()
    dst = torch.empty_like(src)
    ms = ctx.time_ms(lambda: dst.copy_(src))
    ctx.copy_bandwidth = 2 * n / (ms * 1e-3)  # bytes read + written
    size = 8192 if not ctx.dry else 128
    a = torch.randn(size, size, device=ctx.device).to(torch.bfloat16)
    b = torch.randn(size, size, device=ctx.device).to(torch.bfloat16)
    gemm_ms = ctx.time_ms(lambda: a @ b)
    flops = 2 * size**3 / (gemm_ms * 1e-3)
    bandwidth, source = ctx.nominal_bandwidth()
    return [
        Row(
            "environment",
            "info",
            "device-to-device copy (bytes read + written)",
            f"{ctx.copy_bandwidth / 1e12:.3f} TB/s",
            data=dict(copy_bytes_per_s=ctx.copy_bandwidth),
        ),
        Row("environment", "info", f"bf16 GEMM {size}³", f"{flops / 1e12:.1f} TFLOP/s", data=dict(gemm_flops=flops)),
        Row("environment", "info", "bandwidth used for the floors", source, data=dict(floor_bandwidth=bandwidth)),
    ]
