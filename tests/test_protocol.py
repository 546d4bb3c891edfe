"""psq.protocol: round trips, one test per refusal code, and random frames."""

from __future__ import annotations

import contextlib
import dataclasses
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psq import protocol
from psq.layout import Layout
from psq.protocol import Command, ErrorCode, ProtocolError
from psq.stats import LayerGradients

LAYOUT = Layout(("conv.bn", "head.bn"), (3, 2))


def make_gradients(layout: Layout = LAYOUT, dtype: str = "<f4", seed: int = 0) -> LayerGradients:
    rng = np.random.default_rng(seed + 1000)
    return LayerGradients(
        rng.integers(1, 100, layout.layers).astype("<f8"),
        rng.normal(size=layout.total).astype(dtype),
        rng.normal(size=layout.total).astype(dtype),
    )


def make_push(
    layout: Layout = LAYOUT, dtype: str = "<f4", seed: int = 0, gradients: bool = False, **fields
) -> protocol.Push:
    rng = np.random.default_rng(seed)
    counts = rng.integers(16, 100, layout.layers).astype("<f8")
    base = dict(
        job="job",
        worker="w0",
        session=42,
        seq=1,
        step=3,
        layout=layout,
        counts=counts,
        means=rng.normal(size=layout.total).astype(dtype),
        var=rng.random(layout.total).astype(dtype),
        images=np.floor(counts / 16),
        reply_dtype="<f8",
        gradients=make_gradients(layout, dtype, seed) if gradients else None,
    )
    base.update(fields)
    return protocol.Push(**base)


def wire(frames) -> list[bytes]:
    """What a socket would deliver: every frame as bytes."""
    return [bytes(memoryview(f)) for f in frames]


def push_frames(with_layout: bool = False, **fields) -> list[bytes]:
    return wire(protocol.encode_push(make_push(**fields), 0, with_layout))


def with_header(frames: list[bytes], **changes) -> list[bytes]:
    header = msgpack.unpackb(frames[1])
    header.update(changes)
    header = {k: v for k, v in header.items() if v is not ...}
    return [frames[0], msgpack.packb(header), *frames[2:]]


def refused(code: ErrorCode, frames, layouts=None, parse=None) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        msg = protocol.decode(frames, max_bytes=1 << 20)
        (parse or (lambda m: protocol.parse_push(m, layouts if layouts is not None else {LAYOUT.id: LAYOUT})))(msg)
    assert info.value.code is code, info.value
    assert info.value.message  # readable text, not just a code
    return info.value


# -- round trips ------------------------------------------------------------------------------

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20)
layouts = st.lists(st.tuples(names, st.integers(1, 64)), min_size=1, max_size=12, unique_by=lambda t: t[0]).map(
    lambda pairs: Layout(*zip(*pairs))
)


@settings(deadline=None, max_examples=80)
@given(layouts, st.sampled_from(["<f4", "<f8"]), st.booleans(), st.integers(0, 2**64 - 1), st.booleans())
def test_push_round_trips(layout, dtype, with_layout, seq, gradients):
    push = make_push(layout, dtype, seq=seq, gradients=gradients)
    frames = wire(protocol.encode_push(push, 7, with_layout))
    msg = protocol.decode(frames)
    assert (msg.command, msg.key) == (Command.PUSH, 7)
    got = protocol.parse_push(msg, {} if with_layout else {layout.id: layout})
    assert got.layout == layout and got.seq == seq and got.reply_dtype == push.reply_dtype
    pairs = [(got.counts, push.counts), (got.means, push.means), (got.var, push.var), (got.images, push.images)]
    if gradients:
        g, want = got.gradients, push.gradients
        pairs += [(g.counts, want.counts), (g.dy, want.dy), (g.dy_xhat, want.dy_xhat)]
    else:
        assert got.gradients is None
    for a, b in pairs:
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_decoded_arrays_are_views_over_the_frames():
    frames = push_frames()
    msg = protocol.decode(frames)
    assert not msg.arrays[1].flags.owndata


def make_reply(layout: Layout = LAYOUT, dtype: str = "<f4", complete: bool = True, gradients: bool = False):
    rng = np.random.default_rng(1)
    return protocol.HistoryReply(
        5,
        9,
        layout.id,
        rng.random(layout.layers) * 10,
        rng.normal(size=layout.total).astype(dtype),
        rng.random(layout.total).astype(dtype),
        np.arange(layout.layers, dtype="<u8"),
        np.full(layout.layers, 123.0),
        complete,
        make_gradients(layout, dtype) if gradients else None,
    )


@settings(deadline=None, max_examples=40)
@given(layouts, st.sampled_from(["<f4", "<f8"]), st.booleans(), st.booleans())
def test_history_reply_round_trips(layout, dtype, complete, gradients):
    reply = make_reply(layout, dtype, complete, gradients)
    got = protocol.parse_history(protocol.decode(wire(protocol.encode_history(reply, 2))), layout)
    assert (got.seq, got.step, got.complete) == (5, 9, complete)
    assert np.array_equal(got.means, reply.means) and np.array_equal(got.versions, reply.versions)
    assert np.array_equal(got.seen, reply.seen)
    if gradients:
        assert np.array_equal(got.gradients.dy, reply.gradients.dy)
        assert np.array_equal(got.gradients.dy_xhat, reply.gradients.dy_xhat)
        assert np.array_equal(got.gradients.counts, reply.gradients.counts)
    else:
        assert got.gradients is None


def rt(frames) -> protocol.Message:
    return protocol.decode(wire(frames))


def test_control_messages_round_trip():
    assert protocol.parse_error(
        rt(protocol.encode_error(ErrorCode.NO_SHARD, "shard 1 is away", 1, seq=4))
    ) == protocol.Error(ErrorCode.NO_SHARD, "shard 1 is away", 4)
    beat = protocol.Heartbeat(1, 4, "agg-1")
    assert protocol.parse_heartbeat(rt(protocol.encode_heartbeat(beat))) == beat
    assert protocol.parse_welcome(rt(protocol.encode_welcome(3))) == 3
    assert protocol.parse_hello(rt(protocol.encode_hello("j", "w"))) == ("j", "w")
    assert protocol.parse_report(rt(protocol.encode_report({"a": [1, 2]}))) == {"a": [1, 2]}
    protocol.parse_status(rt(protocol.encode_status()))


# -- one test per refusal ------------------------------------------------------------------------


def test_unknown_version_is_refused():
    frames = push_frames()
    frames[0] = struct.pack("<2sBBH", b"PQ", 99, Command.PUSH, 0)
    assert "version 99" in str(refused(ErrorCode.VERSION, frames))


def test_foreign_magic_is_refused():
    frames = push_frames()
    frames[0] = b"HTTP/1"
    refused(ErrorCode.VERSION, frames)


def test_unknown_command_is_refused():
    frames = push_frames()
    frames[0] = struct.pack("<2sBBH", b"PQ", protocol.VERSION, 200, 0)
    refused(ErrorCode.COMMAND, frames)


def test_other_command_where_push_expected_is_refused():
    refused(ErrorCode.COMMAND, wire(protocol.encode_welcome(2)))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda f: f[:1],  # envelope only
        lambda f: f[:-1],  # an array frame missing
        lambda f: [*f, b""],  # an extra frame
        lambda f: f + [b"x"] * 20,  # far too many
        lambda f: [f[0] + b"\0", *f[1:]],  # envelope of the wrong size
    ],
)
def test_wrong_frame_count_is_refused(mutate):
    refused(ErrorCode.FRAMES, mutate(push_frames()))


@pytest.mark.parametrize(
    "header",
    [
        b"\xc1",  # never-used msgpack byte
        b"\x92\x01",  # truncated
        msgpack.packb([1, 2]),  # not a map
        msgpack.packb({1: 2}),  # int map key
        b"\xd4\x01\x02",  # extension type
        msgpack.packb({"a": 1}) + b"\x00",  # trailing data
    ],
)
def test_header_that_is_not_the_expected_map_is_refused(header):
    frames = push_frames()
    frames[1] = header
    refused(ErrorCode.HEADER, frames)


@pytest.mark.parametrize(
    ("changes", "text"),
    [
        ({"job": ...}, "lacks ['job']"),
        ({"seq": -1}, "'seq'"),
        ({"session": -5}, "'session'"),
        ({"seq": True}, "'seq'"),
        ({"step": "3"}, "'step'"),
        ({"job": ""}, "'job'"),
        ({"job": "j" * 300}, "'job'"),
        ({"extra": 1}, "unknown keys"),
        ({"layout": b"short"}, "8 bytes"),
        ({"names": ["conv.bn", "head.bn"]}, "both"),
        ({"arrays": [["<f8", 2], ["<f4", 5]]}, "announces 2 arrays"),
        ({"arrays": "nope"}, "list of"),
        ({"arrays": [["<f8", -2], ["<f4", 5], ["<f4", 5], ["<f8", 2]]}, "non-negative"),
    ],
)
def test_header_with_missing_unknown_or_mistyped_keys_is_refused(changes, text):
    code = ErrorCode.FRAMES if text == "announces 2 arrays" else ErrorCode.HEADER
    assert text in str(refused(code, with_header(push_frames(), **changes)))


@pytest.mark.parametrize("dtype", ["<i4", ">f4", "|O", "<f2", 7])
def test_dtype_not_allowed_is_refused(dtype):
    frames = with_header(push_frames(), arrays=[["<f8", 2], [dtype, 5], ["<f4", 5], ["<f8", 2]])
    refused(ErrorCode.DTYPE, frames)


def test_reply_dtype_not_allowed_is_refused():
    refused(ErrorCode.DTYPE, with_header(push_frames(), reply="<u8"))


def test_mixed_mean_and_variance_dtypes_are_refused():
    frames = push_frames()
    frames[4] = np.zeros(5, "<f8").tobytes()
    refused(ErrorCode.DTYPE, with_header(frames, arrays=[["<f8", 2], ["<f4", 5], ["<f8", 5], ["<f8", 2]]))


def test_images_that_are_not_one_float64_per_layer_are_refused():
    frames = push_frames()
    frames[5] = np.ones(3, "<f8").tobytes()
    assert "images" in str(
        refused(ErrorCode.LAYOUT, with_header(frames, arrays=[["<f8", 2], ["<f4", 5], ["<f4", 5], ["<f8", 3]]))
    )


@pytest.mark.parametrize(
    ("value", "code"), [(np.nan, ErrorCode.NONFINITE), (-1.0, ErrorCode.NEGATIVE), (1e16, ErrorCode.RANGE)]
)
def test_images_out_of_range_are_refused(value, code):
    images = make_push().images.copy()
    images[0] = value
    refused(code, push_frames(images=images))


def test_elements_without_images_are_refused():
    """Images age the history: elements from no image would be kept for ever."""
    images = make_push().images.copy()
    images[1] = 0.0
    assert "must have images" in str(refused(ErrorCode.RANGE, push_frames(images=images)))


def test_more_images_than_elements_are_refused():
    push = make_push()
    assert "more images than elements" in str(refused(ErrorCode.RANGE, push_frames(images=push.counts + 1)))


def test_gradients_must_come_whole():
    frames = push_frames(gradients=True)
    header = msgpack.unpackb(frames[1])
    for keep in (5, 6):  # one or two of the three gradient arrays
        cut = [frames[0], msgpack.packb({**header, "arrays": header["arrays"][:keep]}), *frames[2 : 2 + keep]]
        assert "4 or 7 array frames" in str(refused(ErrorCode.FRAMES, cut))


def _push_with(g: LayerGradients, **changes: tuple[int, float]) -> protocol.Push:
    """A push carrying ``g`` with one value of some of its fields changed."""
    fields = {"counts": g.counts, "dy": g.dy, "dy_xhat": g.dy_xhat}
    for name, (index, value) in changes.items():
        fields[name] = fields[name].copy()
        fields[name][index] = value
    return dataclasses.replace(make_push(), gradients=LayerGradients(**fields))


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("dy", np.nan, ErrorCode.NONFINITE),
        ("dy_xhat", np.inf, ErrorCode.NONFINITE),
        ("dy", -3e38, ErrorCode.RANGE),
        ("dy_xhat", 1e31, ErrorCode.RANGE),
        ("counts", -1.0, ErrorCode.NEGATIVE),
        ("counts", np.nan, ErrorCode.NONFINITE),
    ],
)
def test_gradient_statistics_nonfinite_or_out_of_range_are_refused(field, value, code):
    frames = wire(protocol.encode_push(_push_with(make_gradients(), **{field: (0, value)}), 0, False))
    assert "gradient" in str(refused(code, frames))


def test_negative_gradient_means_are_fine_they_are_signed():
    frames = wire(protocol.encode_push(_push_with(make_gradients(), dy=(0, -5.0), dy_xhat=(1, -7.0)), 0, False))
    got = protocol.parse_push(protocol.decode(frames), {LAYOUT.id: LAYOUT})
    assert got.gradients.dy[0] == -5.0 and got.gradients.dy_xhat[1] == -7.0


@pytest.mark.parametrize(
    ("spec", "code"),
    [
        ([["<f8", 2], ["<f4", 4], ["<f4", 5]], ErrorCode.LAYOUT),  # a channel short
        ([["<f8", 3], ["<f4", 5], ["<f4", 5]], ErrorCode.LAYOUT),  # a count too many
        ([["<f8", 2], ["<f8", 5], ["<f8", 5]], ErrorCode.DTYPE),  # not the means' dtype
    ],
)
def test_gradient_arrays_not_matching_the_layout_are_refused(spec, code):
    frames = push_frames(gradients=True)
    rng = np.random.default_rng(0)
    tail = [rng.normal(size=n).astype(d).tobytes() for d, n in spec]
    header = msgpack.unpackb(frames[1])
    frames = [frames[0], msgpack.packb({**header, "arrays": header["arrays"][:4] + spec}), *frames[2:6], *tail]
    refused(code, frames)


def test_buffer_length_not_matching_dtype_times_shape_is_refused():
    frames = push_frames()
    frames[2] = frames[2][:-1]
    assert "2 x <f8 needs 16 bytes, the frame has 15" in str(refused(ErrorCode.LENGTH, frames))


def test_arrays_not_matching_the_registered_layout_are_refused():
    other = Layout(("conv.bn", "head.bn"), (3, 3))
    frames = push_frames(layout=other)  # right id for `other`, wrong for what the server holds
    refused(ErrorCode.LAYOUT, with_header(frames, layout=LAYOUT.id))


def test_layout_inline_whose_id_does_not_match_is_refused():
    frames = with_header(push_frames(with_layout=True), channels=[3, 3])
    assert "does not match" in str(refused(ErrorCode.LAYOUT, frames, layouts={}))


def test_invalid_layout_inline_is_refused():
    frames = with_header(push_frames(with_layout=True), names=["a", "a"])
    assert "unique" in str(refused(ErrorCode.LAYOUT, frames, layouts={}))


def test_unknown_layout_is_refused():
    refused(ErrorCode.UNKNOWN_LAYOUT, push_frames(), layouts={})


@pytest.mark.parametrize(("index", "value"), [(0, np.nan), (1, np.inf), (2, -np.inf), (1, np.nan)])
def test_nonfinite_values_are_refused(index, value):
    push = make_push()
    array = [push.counts, push.means, push.var][index].copy()
    array[-1] = value
    fields = {0: "counts", 1: "means", 2: "var"}
    refused(ErrorCode.NONFINITE, wire(protocol.encode_push(make_push(**{fields[index]: array}), 0, False)))


def test_large_values_within_range_are_accepted():
    means = np.full(5, 9e29, "<f8")
    got = protocol.parse_push(protocol.decode(push_frames(means=means, dtype="<f8")), {LAYOUT.id: LAYOUT})
    assert np.array_equal(got.means, means)


@pytest.mark.parametrize(("field", "value"), [("means", 3e38), ("means", -1e31), ("var", 1e31), ("counts", 1e16)])
def test_finite_values_out_of_range_are_refused(field, value):
    """They would overflow the merge or a float32 reply and poison a history for good."""
    push = make_push()
    array = getattr(push, field).copy()
    array[0] = value
    refused(ErrorCode.RANGE, wire(protocol.encode_push(make_push(**{field: array}), 0, False)))


@pytest.mark.parametrize("field", ["counts", "var"])
def test_negative_counts_or_variances_are_refused(field):
    push = make_push()
    array = getattr(push, field).copy()
    array[0] = -1.0
    refused(ErrorCode.NEGATIVE, wire(protocol.encode_push(make_push(**{field: array}), 0, False)))


def test_oversized_message_is_refused():
    big = Layout(("a",), (300_000,))
    frames = push_frames(layout=big)
    refused(ErrorCode.OVERSIZED, frames, layouts={big.id: big})


def test_history_reply_for_another_layout_is_refused():
    reply = protocol.HistoryReply(1, 1, b"\0" * 8, np.ones(2), np.zeros(5), np.ones(5), np.zeros(2, "<u8"), np.ones(2))
    refused(
        ErrorCode.LAYOUT, wire(protocol.encode_history(reply, 0)), parse=lambda m: protocol.parse_history(m, LAYOUT)
    )


@pytest.mark.parametrize(("value", "code"), [(np.nan, ErrorCode.NONFINITE), (-2.0, ErrorCode.NEGATIVE)])
def test_history_reply_with_bad_images_seen_is_refused(value, code):
    reply = make_reply()
    reply.seen[1] = value
    frames = wire(protocol.encode_history(reply, 0))
    assert "images seen" in str(refused(code, frames, parse=lambda m: protocol.parse_history(m, LAYOUT)))


def test_history_reply_with_nonfinite_gradient_history_is_refused():
    reply = make_reply(gradients=True)
    reply.gradients.dy_xhat[2] = np.nan
    frames = wire(protocol.encode_history(reply, 0))
    refused(ErrorCode.NONFINITE, frames, parse=lambda m: protocol.parse_history(m, LAYOUT))


def test_heartbeat_with_impossible_shard_is_refused():
    frames = wire(protocol.encode(Command.HEARTBEAT, protocol.BROKER_KEY, {"shard": 2, "shards": 2, "name": "a"}))
    refused(ErrorCode.HEADER, frames, parse=protocol.parse_heartbeat)


def test_sending_an_unsupported_dtype_fails_before_the_wire():
    with pytest.raises(ProtocolError) as info:
        protocol.encode(Command.PUSH, 0, {}, [np.zeros(2, np.int32)])
    assert info.value.code is ErrorCode.DTYPE


# -- random and mutated frames ------------------------------------------------------------------

PARSERS = [
    lambda m: protocol.parse_push(m, {LAYOUT.id: LAYOUT}),
    lambda m: protocol.parse_history(m, LAYOUT),
    protocol.parse_error,
    protocol.parse_heartbeat,
    protocol.parse_welcome,
    protocol.parse_hello,
    protocol.parse_report,
    protocol.parse_status,
]


def only_protocol_errors(frames: list[bytes]) -> None:
    """Any other exception escapes and fails the test."""
    for parse in PARSERS:
        with contextlib.suppress(ProtocolError):
            parse(protocol.decode(frames, max_bytes=1 << 16))


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_random_frames_raise_only_protocol_errors(frames):
    only_protocol_errors(frames)


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_valid_frames_raise_only_protocol_errors(data):
    frames = push_frames(with_layout=data.draw(st.booleans()), gradients=data.draw(st.booleans()))
    i = data.draw(st.integers(0, len(frames) - 1))
    frame = bytearray(frames[i])
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(len(frame) - 1, 0)))
        if op == "flip" and frame:
            frame[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del frame[pos : pos + data.draw(st.integers(1, 8))]
        else:
            frame[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    frames[i] = bytes(frame)
    only_protocol_errors(frames)


def test_a_router_applies_the_frame_rules_without_decoding_and_pairs_replies_by_key_bytes():
    frames = protocol.encode_push(make_push(), 7, True)
    size = sum(memoryview(f).nbytes for f in frames)
    assert protocol.check_frames(frames, max_bytes=size) == size
    with pytest.raises(ProtocolError) as info:
        protocol.check_frames(frames, max_bytes=size - 1)
    assert info.value.code is ErrorCode.OVERSIZED
    with pytest.raises(ProtocolError) as info:
        protocol.check_frames(frames[:1])
    assert info.value.code is ErrorCode.FRAMES
    reply = protocol.encode_history(make_reply(), 7)
    assert protocol.key_bytes(bytes(frames[0])) == protocol.key_bytes(bytes(reply[0])) == (7).to_bytes(2, "little")
    assert protocol.key_bytes(protocol.envelope(Command.PUSH, 8)) != protocol.key_bytes(bytes(reply[0]))
