"""Storage, datasets, samplers, splits and padding. Every name is re-exported flat here."""

__all__: list[str] = []
