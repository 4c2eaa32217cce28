"""Plots that read results from AnnData by key (filled by the transcoder and circuit tools)."""

__all__: list[str] = []
