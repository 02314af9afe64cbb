"""The on-device HTTP service: the Flask app factory, the OpenAI-compatible and health blueprints,
request schemas, errors, auth, metrics, systemd integration, and the engine that runs llama.cpp."""
