"""Circuit tracing on a replacement model: attribution graphs over genes, transcoder features and error nodes.

Nothing here knows about AnnData; :mod:`cellcircuits.tl` maps cells to prompts and graphs back to genes.
"""

from ._attribute import Attribution
from ._feature_pair import FeaturePair, feature_pair
from ._graph import Graph, attribution_graph
from ._influence import edge_influence, node_influence, normalize_matrix
from ._intervene import CleanRun, FeatureEdits, clean_run, edited_features, run_edits, run_feature_edits
from ._kinds import NodeKind
from ._nodes import Nodes
from ._paths import greedy_paths
from ._prune import completeness_score, prune_graph, replacement_score
from ._replacement import ReplacementModel
from ._targets import FeatureTarget, LabelTarget, LogitTarget, label_target
from ._trace import CircuitTables, trace_prompts
from ._validate import validate_prompts
from ._via_heads import ViaHeads

__all__ = [
    "Attribution",
    "CircuitTables",
    "CleanRun",
    "FeatureEdits",
    "FeaturePair",
    "FeatureTarget",
    "Graph",
    "LabelTarget",
    "LogitTarget",
    "NodeKind",
    "Nodes",
    "ReplacementModel",
    "ViaHeads",
    "attribution_graph",
    "clean_run",
    "completeness_score",
    "edge_influence",
    "edited_features",
    "feature_pair",
    "greedy_paths",
    "label_target",
    "node_influence",
    "normalize_matrix",
    "prune_graph",
    "replacement_score",
    "run_edits",
    "run_feature_edits",
    "trace_prompts",
    "validate_prompts",
]
