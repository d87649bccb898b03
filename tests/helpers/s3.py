"""A local S3-compatible endpoint (moto's standalone server) on 127.0.0.1, for the storage tests.

pyarrow, boto3 and Ray (through pyarrow) all read AWS_ENDPOINT_URL, so with `s3_env` set every s3:// URI
of a run goes to the local server: nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from typing import Iterator

from tests.helpers import free_ports, stop

MOTO = os.path.join(os.path.dirname(sys.executable), "moto_server")


def s3_env(endpoint: str) -> dict[str, str]:
    """What a process needs to use the local endpoint as S3 (dummy credentials, no instance metadata lookups)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def moto_server(bucket: str = "recalign-test", timeout: float = 60) -> Iterator[str]:
    """Run moto's server on a free 127.0.0.1 port with `bucket` created; yields its endpoint URL. Stopped by PID."""
    port = free_ports(1)[0]
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([MOTO, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
                break
            except OSError:
                if time.time() > deadline or process.poll() is not None:
                    raise RuntimeError(f"moto_server did not start on {endpoint}")
                time.sleep(0.3)
        request = urllib.request.Request(f"{endpoint}/{bucket}", method="PUT")
        urllib.request.urlopen(request, timeout=10)
        yield endpoint
    finally:
        stop(process, timeout=20)
