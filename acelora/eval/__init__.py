"""Zero-shot classification, multi-label evaluation, prompts, metrics, downstream tasks."""
