"""HTTP route modules (one concern each)."""
