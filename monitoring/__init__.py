"""Drift monitoring and retraining (Evidently)."""
