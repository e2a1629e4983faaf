"""Request and response models of the HTTP API (pydantic), one module per surface."""
