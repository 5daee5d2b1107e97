"""radserve: an AI reading service for CT, MRI and X-ray (import package ``inference``)."""

__version__ = "0.1.0"
