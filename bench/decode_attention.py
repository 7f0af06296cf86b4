"""The decode step's attention read, alone: what the engine does now against a length-aware kernel.

    python -m bench.decode_attention                       # MedMO-8B's heads, 64 rows, span 1,024
    python -m bench.decode_attention --rows 16 --span 512  # smaller, for a quick CPU run

The engine's decode attention (`app/engine/slots.py`, DecodeSlots) reads every row's whole span bucket
under a boolean mask, with scaled_dot_product_attention choosing its kernel. A length-aware kernel reads
each row only as far as its own length: here FlexAttention (torch's own, compiled) with a block mask made
from the rows' lengths, the candidate that needs no extra package. For each it prints the time per call
and the cache it reads; for SDPA, each backend that takes the masked call on this device (the backend to
pin is the fastest of those); and the largest difference from the engine's answer. Lengths are drawn as
the engines bench's mix leaves them: a prompt of a 512x512 image, then up to half an answer.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# MedMO-8B (Qwen3-VL-8B): 32 query heads over 8 key/value heads of 128.
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
BACKENDS = {
    "math": SDPBackend.MATH,
    "memory-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(call: Callable[[], torch.Tensor], repeats: int) -> float:
    """Milliseconds per call, after a warm-up call."""
    call()
    synchronize()
    began = time.perf_counter()
    for _ in range(repeats):
        call()
    synchronize()
    return (time.perf_counter() - began) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--span", type=int, default=1024, help="the span bucket the rows' lengths fall in")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    rows, span = args.rows, args.span
    # A prompt of about 300 tokens, then up to half of a report: most rows end well short of the span.
    lengths = torch.randint(span // 4, span, (rows,), generator=generator).to(device)
    query = torch.randn(rows, HEADS, 1, HEAD_DIM, generator=generator).to(device, dtype)
    keys = torch.randn(rows, KV_HEADS, span, HEAD_DIM, generator=generator).to(device, dtype)
    values = torch.randn(rows, KV_HEADS, span, HEAD_DIM, generator=generator).to(device, dtype)
    mask = (torch.arange(span, device=device).view(1, span) <= lengths.view(rows, 1)).view(rows, 1, 1, span)
    grouped = query.reshape(rows, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)

    def engine_read() -> torch.Tensor:  # DecodeSlots.attend: query heads folded onto their key/value head
        return F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask)

    def lengths_mask(
        batch: torch.Tensor, head: torch.Tensor, q: torch.Tensor, kv: torch.Tensor
    ) -> torch.Tensor:
        return kv <= lengths[batch]

    def block_mask() -> BlockMask:
        # Made again at every step in the engine (the lengths grow): compiled on a GPU, as a captured step
        # would run it (inductor's CPU code for it does not build with torch 2.14).
        return create_block_mask(
            lengths_mask, rows, None, 1, span, device=str(device), _compile=device.type == "cuda"
        )

    compiled_flex = torch.compile(flex_attention)
    blocks = block_mask()

    def flex_read() -> torch.Tensor:
        return compiled_flex(query, keys, values, block_mask=blocks, enable_gqa=True)

    reference = engine_read().reshape(rows, HEADS, 1, HEAD_DIM).float()
    element = keys.element_size()
    span_bytes = 2 * rows * KV_HEADS * span * HEAD_DIM * element
    block = blocks.BLOCK_SIZE[1]
    blocks_read = int(sum((int(length) + block) // block * block for length in lengths.tolist()))
    flex_bytes = 2 * blocks_read * KV_HEADS * HEAD_DIM * element
    print(
        f"{device} {dtype}: {rows} rows, span {span}, {HEADS}/{KV_HEADS} heads of {HEAD_DIM}, real tokens "
        f"{int(lengths.sum())} of {rows * span}; measured in this run\n"
    )
    print(f"{'read':<34}{'ms/call':>10}{'cache MB read':>15}{'max |diff|':>12}")
    for name, backend in BACKENDS.items():
        try:
            with sdpa_kernel([backend]):
                milliseconds = timed(engine_read, args.repeats)
                out = engine_read().reshape(rows, HEADS, 1, HEAD_DIM).float()
        except RuntimeError as exc:
            print(f"{'SDPA ' + name:<34}{'does not take this call: ' + str(exc).splitlines()[0][:60]}")
            continue
        diff = (out - reference).abs().max().item()
        print(
            f"{'SDPA ' + name + ', span + mask':<34}{milliseconds:>10.3f}{span_bytes / 1e6:>15.1f}{diff:>12.2e}"
        )
    milliseconds = timed(engine_read, args.repeats)
    print(f"{'SDPA as chosen, span + mask':<34}{milliseconds:>10.3f}{span_bytes / 1e6:>15.1f}{0.0:>12.2e}")
    diff = (flex_read().float() - reference).abs().max().item()
    print(
        f"{'FlexAttention, block mask':<34}{timed(flex_read, args.repeats):>10.3f}{flex_bytes / 1e6:>15.1f}{diff:>12.2e}"
    )
    print(f"{'  making the block mask':<34}{timed(lambda: block_mask().kv_num_blocks, args.repeats):>10.3f}")


if __name__ == "__main__":
    main()
