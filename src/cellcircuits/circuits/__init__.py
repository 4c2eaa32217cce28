"""Circuit tracing on a replacement model: attribution graphs over genes, transcoder features and error nodes.

Nothing here knows about AnnData; :mod:`cellcircuits.tl` maps cells to prompts and graphs back to genes.
"""
