"""The network, its weights file format, its model card, its content hash and its health check."""
