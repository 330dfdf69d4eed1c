"""batchrouter-receiver: BatchRouter's delivery webhook, received, recorded and stored exactly once."""

__version__ = "0.1.0"
