"""psq's wire format: serialization that never touches a socket (frames in, message out).

A message is a ZeroMQ multipart message (after any routing-identity frames)::

    [envelope, header, array, array, ...]

* ``envelope`` — 6 bytes: ``b"PQ"``, protocol version (u8), command (u8), routing key (u16
  little-endian): the shard a request is for, or :data:`BROKER_KEY`.  The broker reads this
  frame and nothing else.
* ``header`` — one msgpack map.  ``"arrays"`` lists ``[dtype, length]`` for each array frame.
* arrays — raw little-endian buffers, sent and received without copies.

A step's statistics for one shard travel as one ``PUSH``: counts per layer (float64), all
layers' means in one array, all variances in another, and the images per layer (float64: the
unit of the aggregator's half-life); then, when the step had a backward pass, its gradient
statistics (:class:`psq.stats.LayerGradients`: counts per layer, all means of ``∂L/∂y``, all
means of ``∂L/∂y·x̂``).  A ``HISTORY`` reply carries each layer's history, its version and the
images that ever arrived for it (the job's clock), and the gradient history (counts, the two
means) when its push carried gradients.  Every decoder validates everything and raises
:class:`ProtocolError` (a code and a readable message) on any defect; nothing is ever unpickled.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from psq.layout import ID_BYTES, Layout, LayoutError
from psq.stats import LayerGradients

VERSION = 2  # 2: images per layer and gradient statistics in PUSH and HISTORY
MAGIC = b"PQ"
BROKER_KEY = 0xFFFF
MAX_SHARDS = 1024
DEFAULT_MAX_BYTES = 64 << 20
MAX_FRAMES = 16
MAX_HEADER_BYTES = 1 << 20  # a layout of 65,536 names fits; a header is otherwise tiny

_ENVELOPE = struct.Struct("<2sBBH")  # magic, version, command, routing key
_KEY_OFFSET = 4
_DTYPES = {"<f4": np.dtype("<f4"), "<f8": np.dtype("<f8"), "<u8": np.dtype("<u8")}
_STAT_DTYPES = ("<f4", "<f8")
_MAX_STR = 256
_U64 = (1 << 64) - 1


class Command(enum.IntEnum):
    PUSH = 1  # worker -> shard: a step's statistics
    HISTORY = 2  # shard -> worker: the history of the pushed layers
    ERROR = 3  # anyone -> requester
    HELLO = 4  # worker -> broker: how many shards are there?
    WELCOME = 5  # broker -> worker / aggregator: the shard table's size
    HEARTBEAT = 6  # aggregator -> broker: "I own shard i of n", every interval
    STATUS = 7  # anyone -> broker or shard
    REPORT = 8  # broker or shard -> requester: the status as a map


class ErrorCode(str, enum.Enum):
    VERSION = "version"
    COMMAND = "command"
    FRAMES = "frames"
    HEADER = "header"
    DTYPE = "dtype"
    LENGTH = "length"
    LAYOUT = "layout"
    UNKNOWN_LAYOUT = "unknown_layout"
    NONFINITE = "nonfinite"
    NEGATIVE = "negative"
    RANGE = "range"
    OVERSIZED = "oversized"
    NO_SHARD = "no_shard"
    WRONG_SHARD = "wrong_shard"
    SHARD_TAKEN = "shard_taken"
    TIMEOUT = "timeout"
    INTERNAL = "internal"


class ProtocolError(ValueError):
    """A message that psq refuses: ``code`` says which rule it broke, the text says how."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Message:
    """A decoded message: envelope fields, header map and array views over the frames."""

    command: Command
    key: int
    header: dict[str, Any]
    arrays: tuple[np.ndarray, ...] = ()


# -- envelope -----------------------------------------------------------------------------


def envelope(command: Command, key: int) -> bytes:
    return _ENVELOPE.pack(MAGIC, VERSION, command, key)


def key_bytes(envelope_frame: bytes) -> bytes:
    """The routing key's bytes of an envelope, unparsed: a request's and its reply's are equal,
    which is how the broker pairs them without decoding either."""
    return envelope_frame[_KEY_OFFSET : _KEY_OFFSET + 2]


def parse_envelope(frame: Any) -> tuple[Command, int]:
    """The command and routing key of a message's first frame."""
    view = memoryview(frame)
    if view.nbytes != _ENVELOPE.size:
        raise ProtocolError(ErrorCode.FRAMES, f"envelope frame must be {_ENVELOPE.size} bytes, got {view.nbytes}")
    magic, version, command, key = _ENVELOPE.unpack(view)
    if magic != MAGIC:
        raise ProtocolError(
            ErrorCode.VERSION, f"not a psq message: envelope starts {bytes(magic)!r}, expected {MAGIC!r}"
        )
    if version != VERSION:
        raise ProtocolError(
            ErrorCode.VERSION, f"protocol version {version} is not supported (this side speaks {VERSION})"
        )
    try:
        return Command(command), key
    except ValueError:
        raise ProtocolError(
            ErrorCode.COMMAND, f"unknown command {command}; known: {[c.value for c in Command]}"
        ) from None


# -- generic message codec ----------------------------------------------------------------


def encode(command: Command, key: int, header: Mapping[str, Any], arrays: Sequence[np.ndarray] = ()) -> list[Any]:
    """Frames for a message.  Arrays go out as their own buffers (no copy here)."""
    spec = [[_dtype_name(a), int(a.size)] for a in arrays]
    head = msgpack.packb({**header, "arrays": spec}, use_bin_type=True)
    return [envelope(command, key), head, *(np.ascontiguousarray(a) for a in arrays)]


def check_frames(frames: Sequence[Any], max_bytes: int = DEFAULT_MAX_BYTES) -> int:
    """The rules on a message's frames as a whole (their count and total size), which a router
    applies without decoding anything else; returns the size in bytes."""
    if not 2 <= len(frames) <= MAX_FRAMES:
        raise ProtocolError(ErrorCode.FRAMES, f"a message has 2..{MAX_FRAMES} frames, got {len(frames)}")
    size = sum(memoryview(f).nbytes for f in frames)
    if size > max_bytes:
        raise ProtocolError(ErrorCode.OVERSIZED, f"message of {size} bytes exceeds the limit of {max_bytes}")
    return size


def decode(frames: Sequence[Any], max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """Validate frames and build a :class:`Message` whose arrays are views over the frames."""
    views = [memoryview(f) for f in frames]
    check_frames(views, max_bytes)
    command, key = parse_envelope(views[0])
    header = read_header(views[1])
    spec = header.pop("arrays", None)
    arrays = _arrays(spec, views[2:])
    return Message(command, key, header, arrays)


def read_header(frame: Any) -> dict[str, Any]:
    """The header map of a message's second frame, validated as msgpack and as a map."""
    view = memoryview(frame)
    if view.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(ErrorCode.OVERSIZED, f"header of {view.nbytes} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(view, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
    # Any failure to parse untrusted bytes is the sender's defect, whatever msgpack raises.
    except Exception as exc:
        raise ProtocolError(ErrorCode.HEADER, f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(ErrorCode.HEADER, f"header must be a map, got {type(header).__name__}")
    return header


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def _arrays(spec: Any, views: Sequence[memoryview]) -> tuple[np.ndarray, ...]:
    if spec is None:
        spec = []
    if not isinstance(spec, list) or not all(isinstance(s, list) and len(s) == 2 for s in spec):
        raise ProtocolError(ErrorCode.HEADER, f"header 'arrays' must be a list of [dtype, length], got {spec!r:.100}")
    if len(spec) != len(views):
        raise ProtocolError(
            ErrorCode.FRAMES, f"header announces {len(spec)} arrays but {len(views)} array frames arrived"
        )
    out = []
    for i, ((name, length), view) in enumerate(zip(spec, views)):
        dtype = _DTYPES.get(name) if isinstance(name, str) else None
        if dtype is None:
            raise ProtocolError(
                ErrorCode.DTYPE, f"array {i}: dtype {name!r:.40} not allowed; allowed: {sorted(_DTYPES)}"
            )
        if type(length) is not int or length < 0:
            raise ProtocolError(
                ErrorCode.HEADER, f"array {i}: length must be a non-negative integer, got {length!r:.40}"
            )
        if view.nbytes != length * dtype.itemsize:
            raise ProtocolError(
                ErrorCode.LENGTH,
                f"array {i}: {length} x {name} needs {length * dtype.itemsize} bytes, the frame has {view.nbytes}",
            )
        out.append(np.frombuffer(view, dtype=dtype))
    return tuple(out)


def _dtype_name(a: np.ndarray) -> str:
    name = a.dtype.str
    if name not in _DTYPES:
        raise ProtocolError(ErrorCode.DTYPE, f"cannot send dtype {a.dtype}; allowed: {sorted(_DTYPES)}")
    return name


# -- header checks ------------------------------------------------------------------------


def _fields(
    msg: Message,
    required: Mapping[str, type],
    optional: Mapping[str, type] | None = None,
    arrays: tuple[int, ...] = (0,),
) -> dict[str, Any]:
    """The header's fields, checked for exactly the expected keys and their types, and the
    message for one of the allowed numbers of array frames."""
    if len(msg.arrays) not in arrays:
        allowed = " or ".join(map(str, arrays))
        raise ProtocolError(ErrorCode.FRAMES, f"a {msg.command.name} has {allowed} array frames, got {len(msg.arrays)}")
    h, optional = msg.header, optional or {}
    missing = [k for k in required if k not in h]
    if missing:
        raise ProtocolError(ErrorCode.HEADER, f"{msg.command.name} header lacks {missing}; it has {sorted(h)}")
    unknown = [k for k in h if k not in required and k not in optional]
    if unknown:
        raise ProtocolError(ErrorCode.HEADER, f"{msg.command.name} header has unknown keys {unknown[:5]}")
    for k, v in h.items():
        want = required.get(k) or optional[k]
        _check_type(msg.command, k, v, want)
    return h


def _check_type(command: Command, key: str, value: Any, want: type) -> None:
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if ok and want is int:
        ok = 0 <= value <= _U64
    elif ok and want is str:
        ok = 0 < len(value) <= _MAX_STR
    if not ok:
        raise ProtocolError(
            ErrorCode.HEADER, f"{command.name} header '{key}' must be {_describe(want)}, got {value!r:.60}"
        )


def _describe(t: type) -> str:
    return {
        int: "an integer in [0, 2**64)",
        str: f"a string of 1..{_MAX_STR} characters",
        bytes: "bytes",
        bool: "a boolean",
        list: "a list",
        dict: "a map",
    }.get(t, t.__name__)


def _expect(msg: Message, command: Command) -> None:
    if msg.command is not command:
        raise ProtocolError(ErrorCode.COMMAND, f"expected {command.name}, got {msg.command.name}")


# Far beyond any real batch-norm statistic, and far from overflow anywhere downstream: in the
# merge (d² ≤ 4e60 in float64) and in a float32 reply (up to 3.4e38).  Finite values past them
# would poison a history for good, so they are refused like NaN.
MAX_ABS_MEAN = 1e30
MAX_VAR = 1e30
MAX_COUNT = 1e15


def check_stats(counts: np.ndarray, means: np.ndarray, var: np.ndarray) -> None:
    """Finite values within range, non-negative counts and variances; refuses with the rule broken."""
    _check_range("counts", counts, 0.0, MAX_COUNT)
    _check_range("means", means, -MAX_ABS_MEAN, MAX_ABS_MEAN)
    _check_range("variances", var, 0.0, MAX_VAR)


def check_counts(name: str, counts: np.ndarray) -> None:
    """Counts of anything (images seen, say): finite, non-negative and within range."""
    _check_range(name, counts, 0.0, MAX_COUNT)


def check_images(images: np.ndarray, counts: np.ndarray) -> None:
    """Images per layer: within range, no more than the elements they gave, and some wherever
    there are elements (images are what ages a history: none would keep it from decaying)."""
    _check_range("images", images, 0.0, MAX_COUNT)  # NaN fails here, before the comparisons below
    if np.any(images > counts):
        raise ProtocolError(ErrorCode.RANGE, "a layer cannot have more images than elements per channel")
    if np.any((images <= 0) & (counts > 0)):
        raise ProtocolError(ErrorCode.RANGE, "a layer with elements must have images (at least one image each)")


def check_gradients(g: LayerGradients) -> None:
    """Gradient means are signed: finite and within range; their counts non-negative."""
    _check_range("gradient counts", g.counts, 0.0, MAX_COUNT)
    _check_range("gradient means", g.dy, -MAX_ABS_MEAN, MAX_ABS_MEAN)
    _check_range("gradient-x̂ means", g.dy_xhat, -MAX_ABS_MEAN, MAX_ABS_MEAN)


def _check_range(name: str, a: np.ndarray, lo: float, hi: float) -> None:
    if not a.size:
        return
    # A sum of squares below hi² bounds every element by hi (squares cannot cancel, NaN
    # propagates): one BLAS pass, no allocation.  Only a non-negative range needs the minimum.
    with np.errstate(over="ignore", invalid="ignore"):
        # float(): numpy would compare a float32 sum with hi² cast to float32, which is infinity
        if float(np.dot(a, a)) <= hi * hi and (lo < 0 or a.min() >= 0):
            return
    low, high = a.min(), a.max()
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ProtocolError(ErrorCode.NONFINITE, f"{name} contain NaN or infinity")
    if lo == 0.0 and low < 0:
        raise ProtocolError(ErrorCode.NEGATIVE, f"{name} must be >= 0, found {low}")
    if low < lo or high > hi:
        raise ProtocolError(ErrorCode.RANGE, f"{name} must lie in [{lo:g}, {hi:g}], found {low:g}..{high:g}")


# -- PUSH -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Push:
    """One worker's statistics of one step for the layers of one shard."""

    job: str
    worker: str
    session: int  # random per client incarnation, so a restarted worker's sequence starts afresh
    seq: int
    step: int
    layout: Layout
    counts: np.ndarray  # float64, one per layer: elements per channel
    means: np.ndarray  # float32 or float64, layout.total
    var: np.ndarray  # biased, same dtype as means
    images: np.ndarray  # float64, one per layer: the batch items the counts came from
    reply_dtype: str = "<f8"
    gradients: LayerGradients | None = None  # the backward's statistics, same dtype as means


_PUSH_FIELDS = {"job": str, "worker": str, "session": int, "seq": int, "step": int, "layout": bytes, "reply": str}
_LAYOUT_FIELDS = {"names": list, "channels": list}


def encode_push(push: Push, key: int, with_layout: bool) -> list[Any]:
    header: dict[str, Any] = {
        "job": push.job,
        "worker": push.worker,
        "session": push.session,
        "seq": push.seq,
        "step": push.step,
        "layout": push.layout.id,
        "reply": push.reply_dtype,
    }
    if with_layout:
        header["names"] = list(push.layout.names)
        header["channels"] = list(push.layout.channels)
    arrays = (push.counts, push.means, push.var, push.images, *_gradient_frames(push.gradients))
    return encode(Command.PUSH, key, header, arrays)


def _gradient_frames(g: LayerGradients | None) -> tuple[np.ndarray, ...]:
    return () if g is None else (g.counts, g.dy, g.dy_xhat)


def parse_push(msg: Message, layouts: Mapping[bytes, Layout]) -> Push:
    """A validated :class:`Push`; ``layouts`` are those registered so far, by id.

    A header that carries ``names`` and ``channels`` registers its layout (the caller stores
    ``push.layout`` once the push is accepted); one that does not must name a known layout.
    """
    _expect(msg, Command.PUSH)
    h = _fields(msg, _PUSH_FIELDS, _LAYOUT_FIELDS, arrays=(4, 7))
    if h["reply"] not in _STAT_DTYPES:
        raise ProtocolError(ErrorCode.DTYPE, f"reply dtype must be one of {_STAT_DTYPES}, got {h['reply']!r:.20}")
    layout = _push_layout(h, layouts)
    counts, means, var = _stat_arrays(msg.arrays, layout, "<f8")
    check_stats(counts, means, var)
    images = _per_layer(msg.arrays[3], layout, "images")
    check_images(images, counts)
    gradients = _gradient_arrays(msg.arrays[4:], layout, means.dtype.str)
    ids = (h["job"], h["worker"], h["session"], h["seq"], h["step"])
    return Push(*ids, layout, counts, means, var, images, h["reply"], gradients)


def _push_layout(h: Mapping[str, Any], layouts: Mapping[bytes, Layout]) -> Layout:
    lid = h["layout"]
    if len(lid) != ID_BYTES:
        raise ProtocolError(ErrorCode.HEADER, f"layout id must be {ID_BYTES} bytes, got {len(lid)}")
    if "names" not in h and "channels" not in h:
        known = layouts.get(lid)
        if known is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_LAYOUT, f"layout {lid.hex()} is not registered here; send it with names and channels"
            )
        return known
    if "names" not in h or "channels" not in h:
        raise ProtocolError(ErrorCode.HEADER, "a layout needs both 'names' and 'channels'")
    try:
        layout = Layout(tuple(h["names"]), tuple(h["channels"]))
    except LayoutError as exc:
        raise ProtocolError(ErrorCode.LAYOUT, f"invalid layout: {exc}") from None
    if layout.id != lid:
        raise ProtocolError(
            ErrorCode.LAYOUT, f"layout id {lid.hex()} does not match its names and channels ({layout.id.hex()})"
        )
    return layout


def _stat_arrays(arrays: tuple[np.ndarray, ...], layout: Layout, count_dtype: str) -> tuple[np.ndarray, ...]:
    if len(arrays) < 3:
        raise ProtocolError(ErrorCode.FRAMES, f"statistics need 3 arrays (counts, means, variances), got {len(arrays)}")
    counts, means, var = arrays[:3]
    if counts.dtype.str != count_dtype or means.dtype.str not in _STAT_DTYPES or var.dtype != means.dtype:
        raise ProtocolError(
            ErrorCode.DTYPE,
            f"expected counts {count_dtype} and means, variances both in {_STAT_DTYPES}; "
            f"got {counts.dtype.str}, {means.dtype.str}, {var.dtype.str}",
        )
    if counts.size != layout.layers or means.size != layout.total or var.size != layout.total:
        raise ProtocolError(
            ErrorCode.LAYOUT,
            f"layout has {layout.layers} layers and {layout.total} channels; "
            f"arrays have {counts.size} counts, {means.size} means, {var.size} variances",
        )
    return counts, means, var


def _per_layer(a: np.ndarray, layout: Layout, what: str, dtype: str = "<f8") -> np.ndarray:
    if a.dtype.str != dtype or a.size != layout.layers:
        raise ProtocolError(
            ErrorCode.LAYOUT, f"expected {layout.layers} {dtype} {what} (one per layer), got {a.size} {a.dtype.str}"
        )
    return a


def _gradient_arrays(arrays: tuple[np.ndarray, ...], layout: Layout, dtype: str) -> LayerGradients | None:
    """The optional gradient statistics after a message's moments: none, or all three (counts,
    the two means); the caller checked how many arrays there are."""
    if not arrays:
        return None
    counts, dy, dy_xhat = arrays
    _per_layer(counts, layout, "gradient counts")
    if dy.dtype.str != dtype or dy_xhat.dtype.str != dtype:
        raise ProtocolError(
            ErrorCode.DTYPE, f"gradient means must be {dtype} like the means, got {dy.dtype.str}, {dy_xhat.dtype.str}"
        )
    if dy.size != layout.total or dy_xhat.size != layout.total:
        raise ProtocolError(
            ErrorCode.LAYOUT,
            f"layout has {layout.total} channels; gradient arrays have {dy.size} and {dy_xhat.size} values",
        )
    g = LayerGradients(counts, dy, dy_xhat)
    check_gradients(g)
    return g


# -- HISTORY ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HistoryReply:
    """The history of the layers a push carried, as the shard holds it after the push."""

    seq: int
    step: int
    layout_id: bytes
    counts: np.ndarray  # float64, one per layer (all of a layer's channels share it)
    means: np.ndarray
    var: np.ndarray  # biased
    versions: np.ndarray  # uint64, one per layer
    seen: np.ndarray  # float64, one per layer: the images that ever arrived for it (the job's clock)
    complete: bool = True  # sync mode: False when the step's timeout passed before all workers
    gradients: LayerGradients | None = None  # the gradient history, when the push carried gradients


def encode_history(reply: HistoryReply, key: int) -> list[Any]:
    header = {"seq": reply.seq, "step": reply.step, "layout": reply.layout_id, "complete": reply.complete}
    arrays = (reply.counts, reply.means, reply.var, reply.versions, reply.seen, *_gradient_frames(reply.gradients))
    return encode(Command.HISTORY, key, header, arrays)


def parse_history(msg: Message, layout: Layout) -> HistoryReply:
    """A validated :class:`HistoryReply` for a push made with ``layout``."""
    _expect(msg, Command.HISTORY)
    h = _fields(msg, {"seq": int, "step": int, "layout": bytes, "complete": bool}, arrays=(5, 8))
    if h["layout"] != layout.id:
        raise ProtocolError(
            ErrorCode.LAYOUT, f"reply is for layout {h['layout'].hex()}, the push used {layout.id.hex()}"
        )
    counts, means, var = _stat_arrays(msg.arrays, layout, "<f8")
    versions = _per_layer(msg.arrays[3], layout, "versions", "<u8")
    seen = _per_layer(msg.arrays[4], layout, "images seen")
    check_stats(counts, means, var)
    check_counts("images seen", seen)
    gradients = _gradient_arrays(msg.arrays[5:], layout, means.dtype.str)
    ids = (h["seq"], h["step"], h["layout"])
    return HistoryReply(*ids, counts, means, var, versions, seen, h["complete"], gradients)


# -- ERROR ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Error:
    code: ErrorCode
    message: str
    seq: int | None = None


def encode_error(code: ErrorCode, message: str, key: int, seq: int | None = None) -> list[Any]:
    header: dict[str, Any] = {"code": code.value, "message": message[:1000]}
    if seq is not None:
        header["seq"] = seq
    return encode(Command.ERROR, key, header)


def parse_error(msg: Message) -> Error:
    _expect(msg, Command.ERROR)
    h = _fields(msg, {"code": str, "message": object}, {"seq": int})  # message: checked below
    if not isinstance(h["message"], str) or len(h["message"]) > 1000:
        raise ProtocolError(ErrorCode.HEADER, "an ERROR's message must be a string of at most 1000 characters")
    try:
        err = ErrorCode(h["code"])
    except ValueError:  # a code from a newer peer: still an error, reported as such
        err = ErrorCode.INTERNAL
    return Error(err, h["message"], h.get("seq"))


# -- control: HELLO / WELCOME / HEARTBEAT / STATUS / REPORT -------------------------------------


@dataclass(frozen=True)
class Heartbeat:
    """An aggregator's claim, repeated every interval: it owns ``shard`` of ``shards``."""

    shard: int
    shards: int
    name: str


def encode_heartbeat(beat: Heartbeat) -> list[Any]:
    return encode(Command.HEARTBEAT, BROKER_KEY, {"shard": beat.shard, "shards": beat.shards, "name": beat.name})


def parse_heartbeat(msg: Message) -> Heartbeat:
    _expect(msg, Command.HEARTBEAT)
    h = _fields(msg, {"shard": int, "shards": int, "name": str})
    if not 0 < h["shards"] <= MAX_SHARDS or h["shard"] >= h["shards"]:
        raise ProtocolError(
            ErrorCode.HEADER, f"shard must be i/n with 0 <= i < n <= {MAX_SHARDS}, got {h['shard']}/{h['shards']}"
        )
    return Heartbeat(h["shard"], h["shards"], h["name"])


def encode_welcome(shards: int, key: int = BROKER_KEY) -> list[Any]:
    return encode(Command.WELCOME, key, {"shards": shards})


def parse_welcome(msg: Message) -> int:
    _expect(msg, Command.WELCOME)
    shards = _fields(msg, {"shards": int})["shards"]
    if not 0 < shards <= MAX_SHARDS:
        raise ProtocolError(ErrorCode.HEADER, f"shards must be in 1..{MAX_SHARDS}, got {shards}")
    return shards


def encode_hello(job: str, worker: str) -> list[Any]:
    return encode(Command.HELLO, BROKER_KEY, {"job": job, "worker": worker})


def parse_hello(msg: Message) -> tuple[str, str]:
    _expect(msg, Command.HELLO)
    h = _fields(msg, {"job": str, "worker": str})
    return h["job"], h["worker"]


def encode_status(key: int = BROKER_KEY) -> list[Any]:
    return encode(Command.STATUS, key, {})


def parse_status(msg: Message) -> None:
    _expect(msg, Command.STATUS)
    _fields(msg, {})


def encode_report(report: Mapping[str, Any], key: int = BROKER_KEY) -> list[Any]:
    return encode(Command.REPORT, key, {"report": dict(report)})


def parse_report(msg: Message) -> dict[str, Any]:
    _expect(msg, Command.REPORT)
    report = _fields(msg, {"report": dict})["report"]
    return report
