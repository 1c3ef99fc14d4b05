"""The gateway: an OpenAI-compatible proxy in front of engine replicas (tenants, rate limits, fair admission,
model routing, replica picking, failover, coalescing). Entry point: `conveyor gateway --config FILE`."""
