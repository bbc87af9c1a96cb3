"""The training kit every example's loop is assembled from. Every name is re-exported flat here."""

__all__: list[str] = []
