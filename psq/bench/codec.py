"""``psq bench codec``: encode + decode of one step of ResNet-50's statistics.

Side by side in one run: the floor (copying the same bytes once with numpy), plain msgpack of
the arrays' bytes (no validation), and psq's codec (envelope, header, raw array frames, full
validation against the registered layout).
"""

from __future__ import annotations

import msgpack
import numpy as np

from psq import protocol
from psq.bench.shapes import random_stats, resnet50_layout
from psq.bench.timing import emit, interleaved


def run(rounds: int = 30, per_round: int = 200, as_json: bool = False) -> dict[str, float]:
    layout = resnet50_layout()
    counts, means, var = random_stats(layout)
    push = protocol.Push("bench", "w0", 1, 7, 7, layout, counts, means, var, "<f4")
    layouts = {layout.id: layout}
    dst = [np.empty_like(a) for a in (counts, means, var)]

    def floor() -> None:
        for d, s in zip(dst, (counts, means, var)):
            np.copyto(d, s)

    def psq_codec() -> None:
        frames = protocol.encode_push(push, 0, with_layout=False)
        protocol.parse_push(protocol.decode(frames), layouts)

    def plain_msgpack() -> None:
        packed = msgpack.packb(
            {
                "job": "bench",
                "worker": "w0",
                "seq": 7,
                "step": 7,
                "counts": counts.tobytes(),
                "means": means.tobytes(),
                "var": var.tobytes(),
            }
        )
        out = msgpack.unpackb(packed)
        (np.frombuffer(out["counts"]), np.frombuffer(out["means"], np.float32), np.frombuffer(out["var"], np.float32))

    wire = {
        "floor: one numpy copy": sum(a.nbytes for a in (counts, means, var)),
        "psq: encode + decode + validate": sum(memoryview(f).nbytes for f in protocol.encode_push(push, 0, False)),
        "plain msgpack of the bytes": len(
            msgpack.packb(
                {
                    "job": "bench",
                    "worker": "w0",
                    "seq": 7,
                    "step": 7,
                    "counts": counts.tobytes(),
                    "means": means.tobytes(),
                    "var": var.tobytes(),
                }
            )
        ),
    }
    samples = interleaved(dict(zip(wire, (floor, psq_codec, plain_msgpack))), rounds, per_round)
    medians = {name: float(np.median(s)) for name, s in samples.items()}
    floor_s = medians["floor: one numpy copy"]
    rows = [
        [name, medians[name] * 1e6, float(np.percentile(samples[name], 90)) * 1e6, wire[name], medians[name] / floor_s]
        for name in wire
    ]
    emit(
        f"psq bench codec: one step of ResNet-50 statistics "
        f"({layout.layers} layers, {layout.total:,} channels, float32)",
        ["method", "us/msg p50", "us/msg p90", "bytes", "x floor"],
        rows,
        as_json,
        rounds=rounds,
        per_round=per_round,
    )
    return medians
