"""OIP v2 wire format: JSON and binary tensor data, both directions, and the errors for bad bodies."""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import pytest

from runtime.protocol import (
    HEADER_LENGTH,
    InferRequest,
    ProtocolError,
    RequestedOutput,
    decode_content,
    decode_infer_request,
    decode_infer_response,
    encode_infer_request,
    encode_infer_response,
)

TENSORS = {
    "a": np.arange(6, dtype=np.int64).reshape(2, 3),
    "b": np.array([[1.5, -2.25]], dtype=np.float32),
    "c": np.array([-127, 0, 127], dtype=np.int8),
    "empty": np.zeros((0, 32), dtype=np.int8),
}


@pytest.mark.parametrize("binary", [False, True])
def test_request_round_trip(binary: bool) -> None:
    body, headers = encode_infer_request(TENSORS, binary=binary, request_id="r1")
    req = decode_infer_request(body, headers.get(HEADER_LENGTH))
    assert req.id == "r1" and list(req.inputs) == list(TENSORS)
    for name, arr in TENSORS.items():
        got = req.inputs[name]
        assert got.array.dtype == arr.dtype and got.array.shape == arr.shape
        np.testing.assert_array_equal(got.array, arr)
    assert req.inputs["c"].datatype == "INT8" and req.inputs["b"].datatype == "FP32"


def test_nested_json_data_is_row_major() -> None:
    obj = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [2, 2], "data": [[1, 2], [3, 4]]}]}
    req = decode_infer_request(json.dumps(obj).encode())
    np.testing.assert_array_equal(req.inputs["x"].array, [[1, 2], [3, 4]])


@pytest.mark.parametrize("binary_out", [False, True])
def test_response_round_trip(binary_out: bool) -> None:
    outputs = {"probabilities": np.random.rand(4, 3).astype(np.float32), "scores": np.random.rand(4).astype(np.float32)}
    request = InferRequest(inputs={}, outputs=None, id="x", binary_output=binary_out)
    body, headers = encode_infer_response("m", "1", outputs, request)
    assert (HEADER_LENGTH in headers) == binary_out
    got = decode_infer_response(body, headers)
    for k, v in outputs.items():
        np.testing.assert_array_equal(got[k], v)
    header = json.loads(body[: int(headers.get(HEADER_LENGTH, len(body)))])
    assert header["id"] == "x" and header["model_name"] == "m"


def test_requested_outputs_choose_order_and_encoding() -> None:
    outputs = {"probabilities": np.ones((2, 3), np.float32), "scores": np.zeros(2, np.float32)}
    request = InferRequest(inputs={}, outputs=[RequestedOutput("scores", True)])
    body, headers = encode_infer_response("m", "1", outputs, request)
    header = json.loads(body[: int(headers[HEADER_LENGTH])])
    assert [o["name"] for o in header["outputs"]] == ["scores"]
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 8
    assert len(body) == int(headers[HEADER_LENGTH]) + 8


def _req(inp: dict, **extra) -> bytes:
    return json.dumps({"inputs": [inp], **extra}).encode()


@pytest.mark.parametrize(
    "body, header, words",
    [
        (b"{not json", None, "malformed JSON"),
        (b"\xff\xfe", None, "malformed JSON"),
        (b"[1, 2]", None, "must be a JSON object"),
        (b'{"inputs": []}', None, "non-empty list"),
        (_req({"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0]}), None, "input 'x'"),
        (_req({"name": "x", "datatype": "FP8", "shape": [1], "data": [1]}), None, "unsupported datatype"),
        (_req({"name": "x", "datatype": "INT8", "shape": [1], "data": [300]}), None, "does not fit INT8"),
        (_req({"name": "x", "datatype": "INT64", "shape": [2], "data": [1.5, 2]}), None, "must be integers"),
        (_req({"name": "x", "datatype": "FP32", "shape": [2], "data": [[1.0], [1.0, 2.0]]}), None, "ragged"),
        (_req({"name": "x", "datatype": "FP32", "shape": [-1], "data": []}), None, "negative dimension"),
        (_req({"name": "x", "datatype": "FP32", "shape": [1], "data": ["a"]}), None, "numbers"),
        (_req({"name": "x", "datatype": "FP32", "shape": [1]}), None, "no 'data'"),
        (_req({"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 4}}), "0",
         "binary_data_size 4 does not match"),
        (b"{}", "99", HEADER_LENGTH),
    ],
)
def test_bad_bodies_are_protocol_errors(body: bytes, header: str | None, words: str) -> None:
    if header == "0":
        header = str(len(body))
        body += b"\0" * 4
    with pytest.raises(ProtocolError) as e:
        decode_infer_request(body, header)
    assert words in str(e.value) and e.value.status == 400


def test_binary_data_must_be_exactly_consumed() -> None:
    body, headers = encode_infer_request({"x": np.zeros(3, np.float32)}, binary=True)
    with pytest.raises(ProtocolError, match="bytes after the last binary input"):
        decode_infer_request(body + b"\0", headers[HEADER_LENGTH])
    with pytest.raises(ProtocolError, match="input 'x': binary data ends early"):
        decode_infer_request(body[:-1], headers[HEADER_LENGTH])


def test_duplicate_input_is_refused() -> None:
    inp = {"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}
    with pytest.raises(ProtocolError, match="input 'x': given more than once"):
        decode_infer_request(json.dumps({"inputs": [inp, inp]}).encode())


def test_nan_literal_parses_for_the_model_checks_to_name() -> None:
    req = decode_infer_request(b'{"inputs": [{"name": "u", "datatype": "FP32", "shape": [2], "data": [NaN, 1]}]}')
    assert np.isnan(req.inputs["u"].array[0])


# ---------------------------------------------------------------------------------------------
# Compressed request bodies (Content-Encoding), against Python's own gzip and zlib modules
# ---------------------------------------------------------------------------------------------


def _request_body() -> bytes:
    body, _ = encode_infer_request(TENSORS, binary=True)
    return body


@pytest.mark.parametrize("encoding, compress", [
    ("gzip", gzip.compress),
    ("deflate", zlib.compress),  # HTTP's deflate: the zlib format, what Triton's client sends
    ("deflate", lambda b: zlib.compress(b)[2:-4]),  # raw deflate, as some clients send it
    ("GZip", gzip.compress),
    ("gzip", lambda b: gzip.compress(b[:100]) + gzip.compress(b[100:])),  # two gzip members
    ("deflate, gzip", lambda b: gzip.compress(zlib.compress(b))),  # listed in the order applied
    ("identity", lambda b: b),
    ("", lambda b: b),
    (None, lambda b: b),
])  # fmt: skip
def test_compressed_bodies_decode_to_the_original(encoding: str | None, compress) -> None:
    body = _request_body()
    assert decode_content(compress(body), encoding, limit=len(body)) == body


@pytest.mark.parametrize("encoding, data, status, words", [
    ("br", b"whatever", 415, "Content-Encoding 'br' is not supported"),
    ("gzip", b"not gzip at all", 400, "not valid gzip data"),
    ("deflate", b"\xff\xfe not deflate", 400, "not valid deflate data"),
    ("gzip", gzip.compress(b"x" * 5000)[:-12], 400, "gzip data cut short"),
    ("deflate", zlib.compress(b"x" * 5000) + b"tail", 400, "bytes after the end of the deflate data"),
    ("gzip", gzip.compress(b"\0" * (1 << 20)), 413, "larger than the limit of 65536 bytes once decompressed"),
    ("deflate", zlib.compress(b"\0" * 65537), 413, "once decompressed"),
])  # fmt: skip
def test_bad_compressed_bodies_are_refused(encoding: str, data: bytes, status: int, words: str) -> None:
    with pytest.raises(ProtocolError, match=words) as e:
        decode_content(data, encoding, limit=65536)
    assert e.value.status == status


def test_decompression_stops_at_the_limit() -> None:
    """A 256 KB gzip body that would expand to 256 MB is refused after at most limit + 1 bytes are produced."""
    packer, zeros = zlib.compressobj(9, wbits=16 + zlib.MAX_WBITS), bytes(1 << 20)  # gzip, streamed
    bomb = b"".join(packer.compress(zeros) for _ in range(256)) + packer.flush()
    assert len(bomb) < 1 << 20 and zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(bomb, 4096) == bytes(4096)
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(ProtocolError, match="once decompressed"):
        decode_content(bomb, "gzip", limit=1 << 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20
    assert decode_content(zlib.compress(b"\0" * (1 << 20)), "deflate", limit=1 << 20) == b"\0" * (1 << 20)
