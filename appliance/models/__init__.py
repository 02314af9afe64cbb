"""The model files: the catalog of variants, GGUF checks, checksums, and the content-addressed
store that installs, activates and rolls back."""
