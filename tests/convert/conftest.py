"""The convert tests' fixtures live in convert_helpers.py (tests/test_chat.py and tests/test_loading.py use them too)."""
from convert_helpers import checkpoint, converted, truth  # noqa: F401
