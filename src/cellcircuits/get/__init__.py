"""Results from AnnData as DataFrames and graphs (filled by the transcoder and circuit tools)."""

__all__: list[str] = []
