"""Does a CUDA JPEG decode overwrite memory that kernels queued on the caller's stream still read?

    python benchmarks/diagnostics/decode_hazard.py [OUT.json] [--rounds 50] [--size 384] [--batch 8]

Each round fills ``batch`` tensors the size of one decoded image, queues a long kernel and then one
sum per tensor on the caller's stream, frees the tensors while the sums are still queued (the caching
allocator may hand those blocks to the decoder's outputs), decodes ``batch`` JPEGs of that size and
checks every sum. It runs each decoder that imports (torchvision, TorchCodec) twice: called directly
on the caller's stream, and through ``pipelines.torch_backend.decode_jpegs``, which decodes on a
stream of its own, drained on the host first. Each run is done on the default stream and on a side
stream, as the loader calls it. The JSON reports, per arm, the rounds in which at least one sum was
wrong, and the seconds the rounds took.

What it shows: whether this machine's decoder overwrites memory that queued kernels still read when
called directly, and that ``decode_jpegs`` does not. It needs a CUDA device; on the CPU it says so
and exits 2.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time


def _jpegs(n: int, size: int):
    import numpy as np
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        b = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(b, "JPEG", quality=90)
        out.append(torch.frombuffer(bytearray(b.getvalue()), dtype=torch.uint8))
    return out


def corrupted_rounds(decode, jpegs, size: int, rounds: int, side_stream: bool) -> int:
    """Rounds in which a queued sum read memory that ``decode(jpegs)`` overwrote."""
    import torch

    stream = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
    bad = 0
    with torch.cuda.stream(stream):
        for r in range(rounds):
            value = 1 + r % 250
            bufs = [torch.full((3, size, size), value, dtype=torch.uint8, device="cuda") for _ in jpegs]
            torch.cuda.synchronize()
            torch.cuda._sleep(50_000_000)  # tens of ms of work queued ahead of the sums
            sums = [b.sum(dtype=torch.int64) for b in bufs]
            del bufs
            decode(jpegs)
            torch.cuda.synchronize()
            bad += any(int(s) != value * 3 * size * size for s in sums)
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("decode_hazard: needs a CUDA device", file=sys.stderr)
        return 2
    import torchvision
    import torchvision.io as tvio

    from fastssl.pipelines import torch_backend

    decoders = {"torchvision": (torchvision.__version__,
                                lambda d: tvio.decode_jpeg(d, mode=tvio.ImageReadMode.RGB, device="cuda"))}
    try:
        import torchcodec
        from torchcodec.decoders import decode_jpeg as tc_decode

        decoders["torchcodec"] = (torchcodec.__version__, lambda d: tc_decode(d, mode="RGB", device="cuda"))
    except Exception:  # noqa: BLE001 - missing, or built for another torch
        pass
    jpegs = _jpegs(a.batch, a.size)
    rows = []
    for name, (version, direct) in decoders.items():
        torch_backend.JPEG_DECODER = name
        for arm, decode in (("direct", direct), ("decode_jpegs", lambda d: torch_backend.decode_jpegs(d, "cuda"))):
            for side in (False, True):
                decode(jpegs)  # warm: the decoder's handles and first allocations
                t0 = time.perf_counter()
                bad = corrupted_rounds(decode, jpegs, a.size, a.rounds, side)
                rows.append({"decoder": name, "version": version, "arm": arm, "side_stream": side,
                             "rounds": a.rounds, "corrupted_rounds": bad,
                             "seconds": round(time.perf_counter() - t0, 3)})
                print(json.dumps(rows[-1]), flush=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "size": a.size, "batch": a.batch,
           "rows": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
