"""The benchmark: this service against the Flask original and a bare ASGI app (the ceiling)."""
