"""Model quality checks: `conveyor eval perplexity`."""
