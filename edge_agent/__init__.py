"""The edge agent: keeps a device's model at the release its trusted manifest names."""

__all__: list[str] = []
