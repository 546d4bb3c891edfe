"""``psq bench codec``: encode + decode of one step of ResNet-50's statistics.

Side by side in one run, for the forward's moments alone and for a whole training step (the
moments and the backward's gradient means): the floor (copying the same bytes once with numpy),
plain msgpack of the arrays' bytes (no validation), and psq's codec (envelope, header, raw array
frames, full validation against the registered layout).
"""

from __future__ import annotations

from collections.abc import Callable

import msgpack
import numpy as np

from psq import protocol
from psq.bench.shapes import resnet50_layout, step_push
from psq.bench.timing import emit, interleaved
from psq.layout import Layout

MESSAGES = {"moments": False, "moments + gradients": True}


def _cases(layout: Layout, gradients: bool) -> dict[str, tuple[Callable[[], None], int]]:
    """Each method's function and the bytes it moves, for one message."""
    push = step_push(layout, gradients, seq=7)
    layouts = {layout.id: layout}
    arrays = list(protocol.encode_push(push, 0, False)[2:])
    dst = [np.empty_like(a) for a in arrays]

    def floor() -> None:
        for d, s in zip(dst, arrays):
            np.copyto(d, s)

    def psq_codec() -> None:
        frames = protocol.encode_push(push, 0, with_layout=False)
        protocol.parse_push(protocol.decode(frames), layouts)

    def packed() -> bytes:
        fields = {f"a{i}": a.tobytes() for i, a in enumerate(arrays)}
        return msgpack.packb({"job": "bench", "worker": "w0", "seq": 7, "step": 7, **fields})

    def plain_msgpack() -> None:
        out = msgpack.unpackb(packed())
        [np.frombuffer(out[f"a{i}"], a.dtype) for i, a in enumerate(arrays)]

    return {
        "floor: one numpy copy": (floor, sum(a.nbytes for a in arrays)),
        "psq: encode + decode + validate": (
            psq_codec,
            sum(memoryview(f).nbytes for f in protocol.encode_push(push, 0, False)),
        ),
        "plain msgpack of the bytes": (plain_msgpack, len(packed())),
    }


def run(rounds: int = 30, per_round: int = 200, as_json: bool = False) -> dict[str, float]:
    layout = resnet50_layout()
    rows, medians = [], {}
    for message, gradients in MESSAGES.items():
        cases = _cases(layout, gradients)
        samples = interleaved({name: fn for name, (fn, _) in cases.items()}, rounds, per_round)
        m = {name: float(np.median(s)) for name, s in samples.items()}
        floor_s = m["floor: one numpy copy"]
        rows += [
            [message, name, m[name] * 1e6, float(np.percentile(samples[name], 90)) * 1e6, size, m[name] / floor_s]
            for name, (_, size) in cases.items()
        ]
        medians.update({f"{message}: {name}": v for name, v in m.items()})
    emit(
        f"psq bench codec: one step of ResNet-50 statistics "
        f"({layout.layers} layers, {layout.total:,} channels, float32)",
        ["message", "method", "us/msg p50", "us/msg p90", "bytes", "x floor"],
        rows,
        as_json,
        rounds=rounds,
        per_round=per_round,
    )
    return medians
