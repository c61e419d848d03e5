"""The order saga used by the demo and the integration tests."""
