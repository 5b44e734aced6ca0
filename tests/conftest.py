"""Shared pytest setup."""

import os

# Nothing in the test suite may reach the Hugging Face Hub. huggingface_hub reads this once, at import,
# so it must be set before any test module imports diffusers / transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
