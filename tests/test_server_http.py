"""The OIP v2 server over real HTTP on loopback: every route, scores equal to the Session and the eager
model, JSON and binary tensors, bad input (4xx naming the tensor, the server keeps serving), a concurrent
burst, de-duplication, readiness, and graceful shutdown of the `serve` process."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from test_runtime_session import eager_probs, random_requests, small_bundle

from runtime.protocol import HEADER_LENGTH, decode_infer_response, encode_infer_request
from runtime.server import ServerSettings, create_app
from runtime.session import Request, Session

MAX_CANDIDATES = 64
MAX_BODY_MB = 0.5


class ServerThread:
    """uvicorn in a thread on a free loopback port."""

    def __init__(self, app) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def session() -> Session:
    return Session(small_bundle(), device="cpu", threads=2)


@pytest.fixture(scope="module")
def eager(session: Session):
    return session.bundle.verified.build_model()


@pytest.fixture(scope="module")
def server(session: Session):
    settings = ServerSettings(max_batch=16, max_queue_delay_ms=30, max_candidates=MAX_CANDIDATES,
                              max_body_mb=MAX_BODY_MB)  # fmt: skip
    app = create_app(settings, session=session)
    with ServerThread(app) as s:
        s.client = httpx.Client(base_url=s.url, timeout=30)
        s.app = app
        yield s
        s.client.close()


def infer_url(model: str = "transact") -> str:
    return f"/v2/models/{model}/infer"


def post(client: httpx.Client, req: Request, binary: bool = True, binary_output: bool = True, **kw) -> httpx.Response:
    body, headers = encode_infer_request(req.tensors(), binary=binary, binary_output=binary_output, **kw)
    return client.post(infer_url(), content=body, headers=headers)


def metric_sum(text: str, name: str) -> float:
    """The sum of every sample of ``name`` (all label sets) in a /metrics text."""
    found = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return sum(float(v) for v in found)


def metric(client: httpx.Client, name: str) -> float:
    text = client.get("/metrics").text
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


# ---------------------------------------------------------------------------------------------


def test_health_and_metadata_routes(server, session: Session) -> None:
    c = server.client
    assert c.get("/v2/health/live").json() == {"live": True}
    r = c.get("/v2/health/ready")
    assert r.status_code == 200 and r.json() == {"ready": True}
    meta = c.get("/v2").json()
    assert meta["name"] == "transact" and meta["extensions"] == ["binary_tensor_data", "model_configuration"]
    model = c.get("/v2/models/transact").json()
    assert model["name"] == "transact" and model["versions"] == ["1"] and model["platform"] == "transact_cpu"
    inputs = {i["name"]: i for i in model["inputs"]}
    assert set(inputs) == set(Request.tensors(random_requests(session.config, 0)[0]))
    assert inputs["ll_item"] == {"name": "ll_item", "datatype": "INT8", "shape": [-1, 32]}
    assert inputs["user_dense"]["shape"] == [session.config.user_dense_dim]
    assert inputs["request_ts"] == {"name": "request_ts", "datatype": "INT64", "shape": [1]}
    outputs = {o["name"]: o for o in model["outputs"]}
    assert outputs["probabilities"] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}
    assert outputs["scores"] == {"name": "scores", "datatype": "FP32", "shape": [-1]}
    assert c.get("/v2/models/transact/versions/1").json() == model
    assert c.get("/v2/models/transact/ready").json() == {"name": "transact", "ready": True}
    for path in ("/v2/models/nope", "/v2/models/nope/ready", "/v2/models/transact/versions/7",
                 "/v2/models/nope/config", "/v2/models/transact/versions/7/config"):  # fmt: skip
        r = c.get(path)
        assert r.status_code == 404 and "error" in r.json()
    r = c.get("/nowhere")
    assert r.status_code == 404 and "error" in r.json()
    text = c.get("/metrics").text
    for name in ("transact_infer_requests_total", "transact_infer_errors_total", "transact_request_latency_seconds",
                 "transact_batch_size", "transact_queue_depth", "transact_model_ready"):  # fmt: skip
        assert name in text


@pytest.mark.parametrize("binary, binary_output", [(False, False), (True, True), (True, False), (False, True)])
def test_http_scores_equal_session_and_eager(server, session: Session, eager, binary: bool, binary_output: bool):
    reqs = random_requests(session.config, 20, n_cands=15)
    for req, want in zip(reqs, eager_probs(eager, reqs), strict=True):
        r = post(server.client, req, binary=binary, binary_output=binary_output, request_id="abc")
        assert r.status_code == 200, r.text
        assert (HEADER_LENGTH in r.headers) == binary_output
        out = decode_infer_response(r.content, r.headers)
        assert out["probabilities"].shape == (req.num_candidates, 3) and out["scores"].shape == (req.num_candidates,)
        np.testing.assert_allclose(out["probabilities"], want, atol=1e-5, rtol=0)
        np.testing.assert_allclose(out["probabilities"], session.score(req), atol=1e-6, rtol=0)
        np.testing.assert_allclose(out["scores"], session.rank_scores(want), atol=1e-5, rtol=0)


def test_versioned_infer_and_requested_outputs(server, session: Session) -> None:
    req = random_requests(session.config, 21)[0]
    body, headers = encode_infer_request(req.tensors(), binary=False, outputs=["scores"], binary_output=False)
    r = server.client.post("/v2/models/transact/versions/1/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    obj = r.json()
    assert [o["name"] for o in obj["outputs"]] == ["scores"] and obj["model_version"] == "1"
    np.testing.assert_allclose(obj["outputs"][0]["data"], session.run([req]).outputs[0].scores, atol=1e-6)


def _mutate(req: Request, **arrays) -> dict[str, np.ndarray]:
    t = {k: v.copy() for k, v in req.tensors().items()}
    for k, v in arrays.items():
        if v is None:
            t.pop(k)
        else:
            t[k] = v
    return t


def bad_cases(req: Request) -> list[tuple[str, bytes, dict, int, str, str]]:
    """(case, body, headers, status, tensor named in the error, words in the error)."""

    def enc(tensors: dict, binary: bool = True) -> tuple[bytes, dict]:
        return encode_infer_request(tensors, binary=binary)

    t = req.tensors()
    nan_user = t["user_dense"].copy()
    nan_user[0] = np.nan
    inf_item = t["item_dense"].copy()
    inf_item[0, 0] = np.inf
    low = t["ll_item"].copy()
    low[0, 0] = -128
    json_nan = json.loads(enc(_mutate(req), binary=False)[0])
    for i in json_nan["inputs"]:
        if i["name"] == "user_dense":
            i["data"][1] = float("nan")
    json_int8 = json.loads(enc(_mutate(req), binary=False)[0])
    for i in json_int8["inputs"]:
        if i["name"] == "rt_item":
            i["data"][3] = 200
    many = MAX_CANDIDATES + 1
    too_many = _mutate(req, cand_item=np.zeros((many, 32), np.float32), item_dense=np.zeros((many, 8), np.float32))
    long_ll = _mutate(req, ll_ts=np.arange(257, dtype=np.int64), ll_action=np.ones(257, np.int32),
                      ll_surface=np.zeros(257, np.int64), ll_item=np.ones((257, 32), np.int8))  # fmt: skip
    unsorted = t["ll_ts"].copy()
    unsorted[[0, -1]] = unsorted[[-1, 0]]
    body_big, h_big = enc(_mutate(req, extra=np.zeros(int(MAX_BODY_MB * 2**20) // 4 + 10, np.float32)))
    wrong_size, h_ws = enc(_mutate(req))
    h_ws = dict(h_ws)
    obj = json.loads(wrong_size[: int(h_ws[HEADER_LENGTH])])
    obj["inputs"][1]["parameters"]["binary_data_size"] += 4
    head = json.dumps(obj).encode()
    wrong_size = head + wrong_size[int(h_ws[HEADER_LENGTH]) :] + b"\0" * 4
    h_ws[HEADER_LENGTH] = str(len(head))
    js = {"Content-Type": "application/json"}
    return [
        ("malformed json", b'{"inputs": [', js, 400, "", "malformed JSON"),
        ("not an object", b"[]", js, 400, "", "malformed request"),
        ("wrong dtype", *enc(_mutate(req, ll_ts=t["ll_ts"].astype(np.float32))), 400, "ll_ts", "datatype"),
        ("wrong shape", *enc(_mutate(req, ll_item=t["ll_item"][:, :16].copy())), 400, "ll_item", "shape"),
        ("length mismatch", *enc(_mutate(req, rt_action=t["rt_action"][:-1].copy())), 400, "rt_action", "shape"),
        ("nan binary", *enc(_mutate(req, user_dense=nan_user)), 400, "user_dense", "NaN"),
        ("nan json", json.dumps(json_nan).encode(), js, 400, "user_dense", "NaN"),
        ("inf binary", *enc(_mutate(req, item_dense=inf_item)), 400, "item_dense", "infinite"),
        ("int8 -128", *enc(_mutate(req, ll_item=low)), 400, "ll_item", "[-127, 127]"),
        ("int8 200 json", json.dumps(json_int8).encode(), js, 400, "rt_item", "does not fit INT8"),
        ("too many candidates", *enc(too_many), 400, "cand_item", "more than the limit of 64"),
        ("sequence too long", *enc(long_ll), 400, "ll_ts", "more than max_ll=256"),
        ("unsorted", *enc(_mutate(req, ll_ts=unsorted)), 400, "ll_ts", "sorted"),
        ("hour", *enc(_mutate(req, hour=np.array([25], np.int64))), 400, "hour", "[0, 23]"),
        ("unknown input", *enc(_mutate(req, bogus=np.zeros(1, np.float32))), 400, "bogus", "unknown input"),
        ("missing input", *enc(_mutate(req, imp_ts=None)), 400, "imp_ts", "missing input"),
        ("binary size", wrong_size, h_ws, 400, "user_dense", "binary_data_size"),
        ("body over limit", body_big, h_big, 413, "", "larger than the limit"),
        ("gzip over limit", gzip.compress(body_big), {**h_big, "Content-Encoding": "gzip"}, 413, "",
         "once decompressed"),
        ("not gzip", *_with(enc(_mutate(req)), {"Content-Encoding": "gzip"}), 400, "", "not valid gzip data"),
        ("unknown encoding", *_with(enc(_mutate(req)), {"Content-Encoding": "br"}), 415, "", "'br' is not supported"),
    ]


def _with(encoded: tuple[bytes, dict], headers: dict) -> tuple[bytes, dict]:
    body, h = encoded
    return body, {**h, **headers}


def test_bad_input_gets_4xx_naming_the_tensor_and_server_keeps_serving(server, session: Session, eager) -> None:
    req = random_requests(session.config, 22)[0]
    want = eager_probs(eager, [req])[0]
    errors_before = metric(server.client, 'transact_infer_errors_total{kind="invalid_input",model="transact"}')
    for case, body, headers, status, tensor, words in bad_cases(req):
        r = server.client.post(infer_url(), content=body, headers=headers)
        assert r.status_code == status, (case, r.status_code, r.text)
        err = r.json()["error"]
        assert words in err, (case, err)
        if tensor:
            assert tensor in err, (case, err)
        ok = post(server.client, req)  # still serving, still right
        assert ok.status_code == 200, case
        np.testing.assert_allclose(decode_infer_response(ok.content, ok.headers)["probabilities"], want, atol=1e-5)
    r = server.client.post(infer_url("nope"), content=b"{}", headers={"Content-Type": "application/json"})
    assert r.status_code == 404 and r.json() == {"error": "unknown model 'nope'"}
    assert server.client.get(infer_url()).status_code == 405
    errors_after = metric(server.client, 'transact_infer_errors_total{kind="invalid_input",model="transact"}')
    assert errors_after - errors_before >= 12
    assert metric(server.client, 'transact_infer_errors_total{kind="body_too_large",model="transact"}') >= 1
    assert metric(server.client, 'transact_infer_errors_total{kind="unknown_model",model="transact"}') >= 1


def test_tritons_own_client_speaks_to_the_server(server, session: Session, eager) -> None:
    """Triton Inference Server's Python client (``tritonclient.http``), as its users call it: health, metadata,
    inference with JSON and binary tensors, with and without request / response compression, and a bad
    request's error carried back in its exception."""
    import tritonclient.http as triton_http
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    client = triton_http.InferenceServerClient(url=server.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("transact")
        assert client.get_server_metadata()["extensions"] == ["binary_tensor_data", "model_configuration"]
        meta = client.get_model_metadata("transact", model_version="1")
        config = client.get_model_config("transact", model_version="1")
        assert [i["name"] for i in config["input"]] == [i["name"] for i in meta["inputs"]]
        assert [i["dims"] for i in config["input"]] == [[str(d) for d in i["shape"]] for i in meta["inputs"]]
        assert {i["name"] for i in meta["inputs"]} == set(random_requests(session.config, 0)[0].tensors())

        def inputs(tensors: dict[str, np.ndarray], binary: bool) -> list:
            out = []
            for name, array in tensors.items():
                t = triton_http.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
                t.set_data_from_numpy(array, binary_data=binary)
                out.append(t)
            return out

        reqs = random_requests(session.config, 41, n_cands=9) + random_requests(session.config, 42, n_cands=5)
        cases = [(binary, c) for binary in (True, False) for c in (None, "gzip", "deflate")]
        for (binary, compression), req, want in zip(cases, reqs, eager_probs(eager, reqs), strict=True):
            wanted = [triton_http.InferRequestedOutput(n, binary_data=binary) for n in ("scores", "probabilities")]
            result = client.infer("transact", inputs(req.tensors(), binary), outputs=wanted, request_id="t1",
                                  request_compression_algorithm=compression,
                                  response_compression_algorithm=compression)  # fmt: skip
            np.testing.assert_allclose(result.as_numpy("probabilities"), want, atol=1e-5, rtol=0)
            np.testing.assert_allclose(result.as_numpy("scores"), session.rank_scores(want), atol=1e-5, rtol=0)
            assert result.get_response()["id"] == "t1"
        result = client.infer("transact", inputs(reqs[0].tensors(), True))  # no outputs named: all, as JSON
        assert [o["name"] for o in result.get_response()["outputs"]] == ["probabilities", "scores"]
        np.testing.assert_allclose(result.as_numpy("probabilities"), session.score(reqs[0]), atol=1e-6, rtol=0)

        bad = reqs[0].tensors()
        bad["rt_item"] = bad["rt_item"][:, :16].copy()
        with pytest.raises(InferenceServerException) as e:
            client.infer("transact", inputs(bad, True), request_compression_algorithm="gzip")
        assert e.value.status() == "400" and "rt_item" in e.value.message()
    finally:
        client.close()


def test_each_request_is_validated_once(server, session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding validates a request; the batch thread does not go over its arrays again."""
    import runtime.session as rs

    calls = []
    real = rs.validate_request
    monkeypatch.setattr(rs, "validate_request", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    reqs = random_requests(session.config, 31)
    for r in reqs:
        assert post(server.client, r).status_code == 200
    assert len(calls) == len(reqs)


def test_concurrent_burst_every_response_matches_its_request(server, session: Session, eager) -> None:
    reqs = []
    for seed in range(22):
        reqs += random_requests(session.config, 100 + seed, n_cands=3 * (1 + seed % 5))
    reqs = reqs[:64]
    wants = eager_probs(eager, reqs)  # one eager batch of all 64 users
    batches_before = metric(server.client, "transact_batch_size_count")
    start = threading.Barrier(len(reqs))

    limits = httpx.Limits(max_connections=len(reqs), max_keepalive_connections=len(reqs))

    def call(i: int) -> tuple[int, np.ndarray | None]:
        start.wait()
        r = post(client, reqs[i], binary=i % 2 == 0, binary_output=i % 3 != 0)
        return r.status_code, (decode_infer_response(r.content, r.headers)["probabilities"]
                               if r.status_code == 200 else None)  # fmt: skip

    with httpx.Client(base_url=server.url, timeout=60, limits=limits) as client, ThreadPoolExecutor(len(reqs)) as pool:
        results = list(pool.map(call, range(len(reqs))))
    assert [s for s, _ in results] == [200] * len(reqs)
    for (_, got), want in zip(results, wants, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    batches = metric(server.client, "transact_batch_size_count") - batches_before
    assert batches < len(reqs)  # concurrent requests were batched together


def test_identical_users_share_a_request_row(server, session: Session, eager) -> None:
    base = random_requests(session.config, 30)[0]
    others = random_requests(session.config, 31, n_requests=3, n_cands=24)
    # One user, eight requests with different candidates (and two with exactly the same tensors).
    variants = [Request(**{**base.__dict__, "cand_item": o.cand_item[i : i + 3], "item_dense": o.item_dense[i : i + 3]})
                for o in others for i in (0, 3)][:6] + [base, base]  # fmt: skip
    wants = eager_probs(eager, variants)
    for _ in range(3):
        dedup_before = metric(server.client, "transact_deduplicated_requests_total")
        rows_before = metric(server.client, "transact_request_rows_total")
        reqs_before = metric(server.client, "transact_batched_requests_total")
        start = threading.Barrier(len(variants))

        def call(i: int, start: threading.Barrier = start) -> httpx.Response:
            start.wait()
            return post(client, variants[i])

        with httpx.Client(base_url=server.url, timeout=60) as client, ThreadPoolExecutor(len(variants)) as pool:
            responses = list(pool.map(call, range(len(variants))))
        for r, want in zip(responses, wants, strict=True):
            assert r.status_code == 200
            np.testing.assert_allclose(decode_infer_response(r.content, r.headers)["probabilities"], want, atol=1e-5)
        rows = metric(server.client, "transact_request_rows_total") - rows_before
        n = metric(server.client, "transact_batched_requests_total") - reqs_before
        assert n == len(variants)
        if rows < n:
            assert metric(server.client, "transact_deduplicated_requests_total") - dedup_before == n - rows
            return
    pytest.fail("identical users arriving together never shared a request row")


def test_model_configuration_in_tritons_form(server, session: Session) -> None:
    """GET .../config answers as Triton Inference Server's model configuration extension does: its data types, dims
    as strings (protobuf's JSON of int64), no batch dimension, the server's own batching under parameters."""
    c = server.client
    config = c.get("/v2/models/transact/config").json()
    assert config["name"] == "transact" and config["platform"] == "transact_cpu" and config["max_batch_size"] == 0
    inputs = {i["name"]: i for i in config["input"]}
    assert set(inputs) == set(Request.tensors(random_requests(session.config, 0)[0]))
    assert inputs["ll_item"] == {"name": "ll_item", "data_type": "TYPE_INT8", "format": "FORMAT_NONE",
                                 "dims": ["-1", "32"], "is_shape_tensor": False, "optional": False,
                                 "allow_ragged_batch": False}  # fmt: skip
    assert inputs["request_ts"]["data_type"] == "TYPE_INT64" and inputs["request_ts"]["dims"] == ["1"]
    assert inputs["cand_item"]["data_type"] == "TYPE_FP32" and inputs["cand_item"]["dims"] == ["-1", "32"]
    assert config["output"] == [
        {"name": "probabilities", "data_type": "TYPE_FP32", "dims": ["-1", "3"], "is_shape_tensor": False,
         "label_filename": ""},
        {"name": "scores", "data_type": "TYPE_FP32", "dims": ["-1"], "is_shape_tensor": False, "label_filename": ""},
    ]  # fmt: skip
    assert config["instance_group"] == [{"name": "transact_0", "kind": "KIND_CPU", "count": 1, "gpus": []}]
    params = {k: v["string_value"] for k, v in config["parameters"].items()}
    assert params["max_batch"] == "16" and params["max_queue_delay_ms"] == "30" and params["backend"] == "cpu"
    assert params["max_candidates"] == str(MAX_CANDIDATES) and json.loads(params["heads"]) == list(session.config.heads)
    assert c.get("/v2/models/transact/versions/1/config").json() == config


def test_ready_only_after_load(session: Session) -> None:
    gate = threading.Event()

    def load() -> Session:
        gate.wait(30)
        return session

    with ServerThread(create_app(ServerSettings(), load=load)) as s, httpx.Client(base_url=s.url) as c:
        assert c.get("/v2/health/live").status_code == 200
        assert c.get("/v2/health/ready").status_code == 400
        assert c.get("/v2/models/transact/ready").json()["ready"] is False
        r = post(c, random_requests(session.config, 40)[0])
        assert r.status_code == 503 and "not ready" in r.json()["error"]
        r = c.get("/v2/models/transact/config")
        assert r.status_code == 503 and "not ready" in r.json()["error"]
        gate.set()
        deadline = time.time() + 10
        while c.get("/v2/health/ready").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.02)
        assert post(c, random_requests(session.config, 40)[0]).status_code == 200


# ---------------------------------------------------------------------------------------------
# The `serve` process
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_process(bundle: Path, port: int, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "runtime.commands", str(bundle), "--port", str(port), "--device", "cpu",
           "--threads", "1", "--log-level", "warning", *args]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


def test_graceful_shutdown_finishes_the_request_in_flight(session: Session, eager) -> None:
    port = free_port()
    proc = serve_process(small_bundle(), port, "--max-queue-delay-ms", "1500")
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                if httpx.get(url + "/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server never became ready"
            time.sleep(0.1)
        req = random_requests(session.config, 50)[0]
        box: dict = {}

        def call() -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                box["r"] = post(c, req)

        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.5)  # the request now waits in the batcher's queue (1.5 s delay)
        assert "r" not in box
        proc.send_signal(signal.SIGTERM)
        t.join(30)
        r = box["r"]
        assert r.status_code == 200
        np.testing.assert_allclose(decode_infer_response(r.content, r.headers)["probabilities"],
                                   eager_probs(eager, [req])[0], atol=1e-5)  # fmt: skip
        # uvicorn re-raises the SIGTERM it caught once the drain is done: a clean, signalled exit
        assert proc.wait(30) in (0, -signal.SIGTERM)
        assert b"Traceback" not in proc.stderr.read()
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/v2/health/live")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("args", [(), ("--workers", "2")], ids=["one-process", "workers"])
def test_serve_refuses_a_tampered_bundle(tmp_path: Path, args: tuple[str, ...]) -> None:
    import shutil

    bad = tmp_path / "bundle"
    shutil.copytree(small_bundle(), bad)
    data = bytearray((bad / "weights.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (bad / "weights.safetensors").write_bytes(bytes(data))
    proc = serve_process(bad, free_port(), *args)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "weights.safetensors" in err.decode() and "sha256" in err.decode()


def _children(pid: int) -> list[int]:
    """Child process ids of ``pid`` (Linux /proc)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _workers(pid: int) -> list[int]:
    """The worker processes (multiprocessing spawn children) of the server process ``pid``."""
    out = []
    for c in _children(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes():
                out.append(c)
        except OSError:  # gone meanwhile
            pass
    return out


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(kv.decode().split("=", 1) for kv in raw if b"=" in kv)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")
def test_serve_with_worker_processes(session: Session, eager) -> None:
    """`transact serve --workers 2`: two worker processes on one port answer a concurrent burst, every
    response for its own request; /metrics reports the same sums over the workers on any connection;
    SIGTERM stops the supervisor and its workers and removes their metrics folder."""
    port = free_port()
    proc = serve_process(small_bundle(), port, "--workers", "2")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                if httpx.get(url + "/v2/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server never became ready"
            time.sleep(0.2)
        workers = _workers(proc.pid)
        assert len(workers) == 2
        metrics_dir = Path(_environ(workers[0])["PROMETHEUS_MULTIPROC_DIR"])
        assert metrics_dir.is_dir()
        # The first worker to be ready answers; wait for the second too (its readiness gauge exists and the
        # minimum over both is 1), so that the sums below cover a steady pair.
        while True:
            if len(list(metrics_dir.glob("gauge_livemin_*.db"))) == 2:
                with httpx.Client(base_url=url, timeout=30) as c:
                    if metric(c, "transact_model_ready") == 1.0:
                        break
            assert time.time() < deadline, "the second worker never became ready"
            time.sleep(0.2)

        reqs = [r for seed in (60, 61, 62) for r in random_requests(session.config, seed, n_cands=5)]
        want = eager_probs(eager, reqs)

        def call(i: int) -> np.ndarray:
            with httpx.Client(base_url=url, timeout=120) as c:  # a connection each, accepted by either worker
                r = post(c, reqs[i % len(reqs)])
                assert r.status_code == 200, r.text
                return decode_infer_response(r.content, r.headers)["probabilities"]

        n = 16
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(call, range(n)))
        for i, p in enumerate(got):
            np.testing.assert_allclose(p, want[i % len(reqs)], atol=1e-5)
        totals = set()
        for _ in range(4):  # fresh connections land on either worker: the same sums each time
            with httpx.Client(base_url=url, timeout=30) as c:
                totals.add((metric(c, "transact_infer_success_total"), metric(c, "transact_infer_requests_total"),
                            metric(c, "transact_model_ready")))  # fmt: skip
        assert totals == {(float(n), float(n), 1.0)}

        # A worker that dies is replaced; the other answers meanwhile, and nothing it counted is lost.
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.time() + 180
        while not (len(now := _workers(proc.pid)) == 2 and workers[0] not in now):
            assert time.time() < deadline, "the dead worker was not replaced"
            time.sleep(0.2)
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(call, range(n)))
        for i, p in enumerate(got):
            np.testing.assert_allclose(p, want[i % len(reqs)], atol=1e-5)
        with httpx.Client(base_url=url, timeout=30) as c:
            text = c.get("/metrics").text
        assert metric_sum(text, "transact_infer_success_total") == 2 * n  # the dead worker's count included
        assert metric_sum(text, "transact_infer_requests_total") == 2 * n
        assert metric_sum(text, "transact_infer_errors_total") == 0.0
        workers = _workers(proc.pid)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert b"Traceback" not in proc.stderr.read()
        assert not any(Path(f"/proc/{w}").exists() for w in workers)
        assert not metrics_dir.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_forget_dead_workers_drops_only_their_live_gauges(tmp_path: Path) -> None:
    from runtime.metrics import forget_dead_workers

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    me = os.getpid()
    names = [f"gauge_livesum_{gone.pid}.db", f"gauge_livemin_{gone.pid}.db", f"counter_{gone.pid}.db",
             f"histogram_{gone.pid}.db", f"gauge_livesum_{me}.db", f"gauge_livemin_{me}.db"]  # fmt: skip
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert forget_dead_workers(tmp_path) == [gone.pid]
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(names[2:])


def test_serve_workers_refuse_a_missing_gpu_before_starting_them() -> None:
    # No visible GPU for the server, on any machine.
    proc = serve_process(small_bundle(), free_port(), "--workers", "2", "--device", "cuda",
                         env={"CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    text = err.decode()
    assert "needs a CUDA GPU" in text and "Traceback" not in text and "spawn_main" not in text



@pytest.mark.parametrize(("cpus", "workers", "threads", "want"), [(8, 2, None, 4), (8, 3, None, 2), (2, 4, None, 1),
                                                                  (8, 2, 3, 3)])  # fmt: skip
def test_serve_shares_the_cpus_out_among_its_workers(monkeypatch: pytest.MonkeyPatch, cpus: int, workers: int,
                                                     threads: int | None, want: int) -> None:  # fmt: skip
    """Each worker process holds its own ONNX Runtime sessions: without --threads, each gets its share of the CPUs
    (at least one), not all of them; --threads is taken as given."""
    from click.testing import CliRunner

    import runtime.backends.cpu as cpu_backend
    import runtime.server as server_module
    from runtime.commands import serve_cmd

    seen: dict = {}
    monkeypatch.setattr(cpu_backend, "usable_cpus", lambda: cpus)
    monkeypatch.setattr(server_module, "serve_workers",
                        lambda bundle, settings, options, n, **kw: seen.update(options=options, workers=n))  # fmt: skip
    args = [str(small_bundle()), "--device", "cpu", "--workers", str(workers)]
    result = CliRunner().invoke(serve_cmd, args + (["--threads", str(threads)] if threads else []))
    assert result.exit_code == 0, result.output
    assert seen["workers"] == workers and seen["options"]["threads"] == want
    assert f"{workers} worker processes of {want} ONNX Runtime thread" in result.output
