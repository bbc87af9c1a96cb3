"""Loss functions and evaluation metrics. Every name is re-exported flat here."""

__all__: list[str] = []
