"""Open Inference Protocol v2 (KServe / Triton Inference Server REST) tensors on the wire.

Requests and responses are JSON objects; tensor data travels either as JSON arrays (``"data"``, row-major,
flat or nested) or, with the binary tensor data extension, as raw little-endian bytes after the JSON
header: the ``Inference-Header-Content-Length`` HTTP header gives the JSON length and each binary tensor
carries ``"parameters": {"binary_data_size": n}``. Outputs come back as binary data when the request asks
for it (``outputs[i].parameters.binary_data`` or the request parameter ``binary_data_output``).

This module only knows the wire format; what the tensors must hold is checked by ``runtime.session``.
Every problem raises ``ProtocolError`` with an HTTP status and a message naming the tensor.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"

# OIP datatype -> little-endian numpy dtype (BYTES is not used by this model).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}  # fmt: skip
NUMPY_TO_DATATYPE = {v.newbyteorder("="): k for k, v in DATATYPES.items()}


class ProtocolError(Exception):
    """A request the protocol layer refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind or ("malformed" if message.startswith("malformed") else "invalid_input")


@dataclass
class InputTensor:
    name: str
    datatype: str
    array: np.ndarray


@dataclass
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    """A decoded ``POST .../infer`` body."""

    inputs: dict[str, InputTensor]
    outputs: list[RequestedOutput] | None = None  # None: every output, in the model's order
    id: str | None = None
    binary_output: bool = False  # request-level ``binary_data_output``
    parameters: dict[str, Any] = field(default_factory=dict)


def datatype_of(array: np.ndarray) -> str:
    try:
        return NUMPY_TO_DATATYPE[array.dtype.newbyteorder("=")]
    except KeyError:
        raise ProtocolError(f"unsupported numpy dtype {array.dtype}") from None


# ---------------------------------------------------------------------------------------------
# Decoding requests (server side)
# ---------------------------------------------------------------------------------------------

# The request Content-Encodings that Triton Inference Server's HTTP endpoint accepts (its client's
# ``request_compression_algorithm``), with the zlib window bits that decode each; None: nothing to undo.
CONTENT_ENCODINGS: dict[str, int | None] = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS, "identity": None}


def decode_content(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    """The request body with its ``Content-Encoding`` undone (``gzip``, ``deflate``, ``identity``, or several
    listed in the order they were applied). The ``Inference-Header-Content-Length`` header counts the
    decoded body. Decompression stops at ``limit`` bytes (413): a small gzip body can expand a thousandfold."""
    if not content_encoding:
        return body
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    for coding in reversed(codings):
        if coding not in CONTENT_ENCODINGS:
            raise ProtocolError(f"Content-Encoding '{coding}' is not supported (gzip, deflate or identity)", 415,
                                kind="malformed")  # fmt: skip
        wbits = CONTENT_ENCODINGS[coding]
        if wbits is not None:
            body = _inflate(body, coding, wbits, limit)
    return body


def _inflate(data: bytes, coding: str, wbits: int, limit: int) -> bytes:
    out = bytearray()
    while True:  # a gzip body may hold several members, one after the other
        d = zlib.decompressobj(wbits)
        try:
            out += d.decompress(data, limit + 1 - len(out))  # len(out) <= limit here, so the cap is never 0
        except zlib.error as e:
            if coding == "deflate" and wbits > 0 and not out:  # HTTP's deflate is zlib; some clients send it raw
                return _inflate(data, coding, -zlib.MAX_WBITS, limit)
            raise ProtocolError(f"malformed request body: not valid {coding} data (Content-Encoding): {e}") from None
        if len(out) > limit:
            raise ProtocolError(f"request body is larger than the limit of {limit} bytes once decompressed "
                                "(--max-body-mb)", 413, kind="body_too_large")  # fmt: skip
        if not d.eof:
            raise ProtocolError(f"malformed request body: {coding} data cut short (Content-Encoding)")
        data = d.unused_data
        if not data:
            return bytes(out)
        if coding != "gzip":
            raise ProtocolError(f"malformed request body: bytes after the end of the {coding} data (Content-Encoding)")


def _header_length(value: str | None, body_size: int) -> int | None:
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise ProtocolError(f"{HEADER_LENGTH}: expected an integer, got {value!r}") from None
    if n < 0 or n > body_size:
        raise ProtocolError(f"{HEADER_LENGTH}: {n} is outside the body ({body_size} bytes)")
    return n


def _parse_json(data: bytes) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(f"malformed JSON: not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        # NaN / Infinity literals parse (as many clients send them); the model-side checks then refuse
        # them with the tensor's name.
        return json.loads(text)
    except (json.JSONDecodeError, ValueError) as e:
        raise ProtocolError(f"malformed JSON: {e}") from None


def _shape(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise ProtocolError(f"input '{name}': 'shape' must be a list of integers")
    if any(d < 0 for d in value):
        raise ProtocolError(f"input '{name}': shape {value} has a negative dimension")
    return tuple(value)


def _json_array(name: str, datatype: str, data: Any, shape: tuple[int, ...]) -> np.ndarray:
    """JSON ``data`` (flat or nested row-major) -> array of ``shape``, checking element types and range."""
    if not isinstance(data, list):
        data = [data]
    try:
        arr = np.asarray(data)
    except ValueError:
        raise ProtocolError(f"input '{name}': 'data' is a ragged nested list") from None
    if arr.dtype == object and arr.size:
        raise ProtocolError(f"input '{name}': 'data' must hold only numbers (or integers out of range)")
    dtype = DATATYPES[datatype]
    count = math.prod(shape)
    if arr.size != count:
        raise ProtocolError(f"input '{name}': shape {list(shape)} needs {count} values, 'data' has {arr.size}")
    if arr.size == 0:
        return np.zeros(shape, dtype=dtype)
    kind = arr.dtype.kind
    if dtype.kind in "iu":
        if kind not in "iu":
            raise ProtocolError(f"input '{name}': {datatype} data must be integers, got {arr.dtype.name} values")
        info = np.iinfo(dtype)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < info.min or hi > info.max:
            bad = lo if lo < info.min else hi
            raise ProtocolError(f"input '{name}': value {bad} does not fit {datatype}")
    elif dtype.kind == "f":
        if kind not in "iuf":
            raise ProtocolError(f"input '{name}': {datatype} data must be numbers, got {arr.dtype.name} values")
    elif dtype.kind == "b" and kind != "b":
        raise ProtocolError(f"input '{name}': BOOL data must be true/false")
    return arr.astype(dtype).reshape(shape)


def decode_infer_request(body: bytes, header_length: str | None = None) -> InferRequest:
    """Parse an infer request body (JSON, or JSON + binary tensors when ``header_length`` is given)."""
    n = _header_length(header_length, len(body))
    header, binary = (body, b"") if n is None else (body[:n], memoryview(body)[n:])
    obj = _parse_json(header)
    if not isinstance(obj, dict):
        raise ProtocolError("malformed request: the body must be a JSON object")
    inputs_obj = obj.get("inputs")
    if not isinstance(inputs_obj, list) or not inputs_obj:
        raise ProtocolError("malformed request: 'inputs' must be a non-empty list")
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("malformed request: 'parameters' must be an object")
    req_id = obj.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise ProtocolError("malformed request: 'id' must be a string")

    inputs: dict[str, InputTensor] = {}
    offset = 0
    for i, item in enumerate(inputs_obj):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProtocolError(f"malformed request: inputs[{i}] needs a string 'name'")
        name = item["name"]
        if name in inputs:
            raise ProtocolError(f"input '{name}': given more than once")
        datatype = item.get("datatype")
        if datatype not in DATATYPES:
            raise ProtocolError(f"input '{name}': unsupported datatype {datatype!r}")
        shape = _shape(name, item.get("shape"))
        iparams = item.get("parameters") or {}
        if not isinstance(iparams, dict):
            raise ProtocolError(f"input '{name}': 'parameters' must be an object")
        size = iparams.get("binary_data_size")
        if size is not None:
            if "data" in item:
                raise ProtocolError(f"input '{name}': has both 'data' and binary_data_size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ProtocolError(f"input '{name}': binary_data_size must be a non-negative integer")
            dtype = DATATYPES[datatype]
            want = math.prod(shape) * dtype.itemsize
            if size != want:
                raise ProtocolError(f"input '{name}': binary_data_size {size} does not match shape {list(shape)} "
                                    f"of {datatype} ({want} bytes)")  # fmt: skip
            if offset + size > len(binary):
                raise ProtocolError(f"input '{name}': binary data ends early ({len(binary) - offset} of {size} bytes)")
            arr = np.frombuffer(binary[offset : offset + size], dtype=dtype).reshape(shape)
            offset += size
        elif "data" in item:
            arr = _json_array(name, datatype, item["data"], shape)
        else:
            raise ProtocolError(f"input '{name}': no 'data' and no binary_data_size")
        inputs[name] = InputTensor(name, datatype, arr)
    if offset != len(binary):
        raise ProtocolError(f"binary data: {len(binary) - offset} bytes after the last binary input")

    outputs = None
    if obj.get("outputs") is not None:
        outs = obj["outputs"]
        if not isinstance(outs, list):
            raise ProtocolError("malformed request: 'outputs' must be a list")
        outputs = []
        for i, o in enumerate(outs):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise ProtocolError(f"malformed request: outputs[{i}] needs a string 'name'")
            oparams = o.get("parameters") or {}
            binary_flag = oparams.get("binary_data", params.get("binary_data_output", False))
            outputs.append(RequestedOutput(o["name"], bool(binary_flag)))
    return InferRequest(inputs, outputs, req_id, bool(params.get("binary_data_output", False)), params)


# ---------------------------------------------------------------------------------------------
# Encoding responses (server side)
# ---------------------------------------------------------------------------------------------


def encode_infer_response(
    model_name: str, model_version: str, outputs: dict[str, np.ndarray], request: InferRequest
) -> tuple[bytes, dict[str, str]]:
    """The response body and extra headers; binary outputs follow the JSON header in output order."""
    wanted = request.outputs
    if wanted is None:
        wanted = [RequestedOutput(name, request.binary_output) for name in outputs]
    out_json, blobs = [], []
    for o in wanted:
        arr = np.ascontiguousarray(outputs[o.name])
        entry: dict[str, Any] = {"name": o.name, "datatype": datatype_of(arr), "shape": list(arr.shape)}
        if o.binary:
            blob = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = arr.reshape(-1).tolist()
        out_json.append(entry)
    obj: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": out_json}
    if request.id is not None:
        obj["id"] = request.id
    header = json.dumps(obj, separators=(",", ":")).encode()
    if not blobs:
        return header, {"Content-Type": "application/json"}
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
    return header + b"".join(blobs), headers


# ---------------------------------------------------------------------------------------------
# Client side (tests, benchmarks, the demo)
# ---------------------------------------------------------------------------------------------


def encode_infer_request(
    inputs: dict[str, np.ndarray], binary: bool = True, binary_output: bool = True,
    outputs: list[str] | None = None, request_id: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Client helper: an infer request body and headers (binary tensor extension when ``binary``)."""
    items, blobs = [], []
    for name, arr in inputs.items():
        arr = np.ascontiguousarray(arr)
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(arr), "shape": list(arr.shape)}
        if binary:
            blob = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = arr.reshape(-1).tolist()
        items.append(entry)
    obj: dict[str, Any] = {"inputs": items}
    if request_id is not None:
        obj["id"] = request_id
    if outputs is not None:
        obj["outputs"] = [{"name": o, "parameters": {"binary_data": binary_output}} for o in outputs]
    elif binary_output:
        obj["parameters"] = {"binary_data_output": True}
    header = json.dumps(obj, separators=(",", ":")).encode()
    if not binary:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def decode_infer_response(body: bytes, headers: Any) -> dict[str, np.ndarray]:
    """Client helper: output name -> array from a response (JSON or binary extension)."""
    n = headers.get(HEADER_LENGTH) if headers is not None else None
    n = int(n) if n is not None else len(body)
    obj = json.loads(body[:n])
    if "error" in obj:
        raise ProtocolError(obj["error"])
    out, offset = {}, n
    for o in obj["outputs"]:
        dtype = DATATYPES[o["datatype"]]
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            out[o["name"]] = np.frombuffer(body[offset : offset + size], dtype=dtype).reshape(o["shape"])
            offset += size
        else:
            out[o["name"]] = np.asarray(o["data"], dtype=dtype).reshape(o["shape"])
    return out
