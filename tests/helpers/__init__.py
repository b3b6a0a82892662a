"""Code shared by the tests (imported as tests.helpers.X; pytest fixtures stay in tests/conftest.py)."""
