"""Autoscaler: LLM signals from /metrics → desired replicas → actuator (local processes | Ray)."""
