"""The storage layer: how a store is reached, from both sides (see docs/ARCHITECTURE.md)."""
