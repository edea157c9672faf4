"""cectl: train Context Encoders at scale (shard -> load -> train -> checkpoint -> evaluate)."""

__version__ = "0.1.0"
