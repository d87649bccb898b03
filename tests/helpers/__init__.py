"""Test helpers shared across the test tree: tiny models, data, fake engines and pairs files; free ports and
stopping the servers a test started."""

import os
import socket
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 (all held open while they are picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def stop(process: subprocess.Popen, timeout: float) -> None:
    """Terminate a server this test started (by its PID), killing it if it does not exit within `timeout`."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
