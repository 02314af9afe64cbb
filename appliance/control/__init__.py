"""The control machine's side: what it builds once for a whole fleet (the llama.cpp cross build,
the aarch64 wheelhouse). Device code never imports this package."""
