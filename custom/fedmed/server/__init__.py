"""Server side, pure: the round engine and what it decides with (screening, aggregation, robust/, trust, resume, anchors)."""
