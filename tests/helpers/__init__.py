"""Test helpers shared across the test tree: tiny models, data, fake engines and pairs files."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
