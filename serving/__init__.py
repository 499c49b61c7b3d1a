"""The model server (KServe)."""
