"""The re-ranking service: request validation, and the Serve app over real HTTP."""

import json
import socket
import urllib.error
import urllib.request

import pytest

from recalign.rerank.scorer import RerankConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.ray
def test_serve_app_over_http(ray_local, tiny_llama_dir, ml100k_dir, tmp_path):
    import os

    from ray import serve

    from serve.app import ServeJob, build

    run_dir = os.path.dirname(ml100k_dir)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        cfg = ServeJob(run_dir=run_dir, model=str(tiny_llama_dir), rerank=RerankConfig(max_new_tokens=1))
        serve.run(build(cfg), name="recalign-test", route_prefix="/rerank")
        url = f"http://127.0.0.1:{port}/rerank"
        status, reply = _post(url, {"history": ["50", "172"], "candidates": ["1", "2", "3"]})
        assert status == 200 and len(reply["ranking"]) == 3
        status, reply = _post(url, {"history": ["50"], "candidates": ["nope"]})
        assert status == 400 and "unknown item id 'nope'" in reply["error"]
    finally:
        serve.shutdown()
