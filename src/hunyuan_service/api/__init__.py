"""The HTTP layer: routes, renderers, body I/O, middleware and request schemas."""
