"""Every call the receiver makes to the BatchRouter API: the client (`client.py`) and the answers it
reads into typed records (`answers.py`)."""

from .answers import ArtifactLinks, Batch, ResultsPage
from .client import BatchRouterClient

__all__ = ["ArtifactLinks", "Batch", "BatchRouterClient", "ResultsPage"]
