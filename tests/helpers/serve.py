"""Calling the Serve app over real HTTP in tests: the test key and a JSON client that returns (status, body)."""

import json
import urllib.error
import urllib.request

KEY = "test-key-0123456789"


def call(url, body=None, key=KEY, raw: bytes | None = None, method=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            return err.code, json.loads(text)
        except ValueError:
            return err.code, {"raw": text[:500].decode(errors="replace")}
