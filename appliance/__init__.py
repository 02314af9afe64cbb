"""pi-llm-appliance: a private, offline LLM service for the Raspberry Pi 5."""

__version__ = "0.1.0"
