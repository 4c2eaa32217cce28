"""Cell2Sentence prompt settings and prompt building (pure Python, no torch)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

#: Cell2Sentence single-cell cell-type prediction template 0. C2S draws one of 15 templates per cell; a fixed
#: one keeps the token positions of the template comparable between cells, which circuit tracing relies on.
C2S_CELL_TYPE_TEMPLATE = (
    "The following is a list of {num_genes} gene names ordered by descending expression level in a "
    "{organism} cell. Your task is to give the cell type which this cell belongs to based on its gene "
    "expression.\nCell sentence: {cell_sentence}.\nThe cell type corresponding to these genes is:"
)

#: File that stores :class:`PromptConfig` beside a model's weights.
PROMPT_CONFIG_NAME = "cellcircuits.json"


@dataclass
class PromptConfig:
    """How a model was trained to read cells: its prompt template, sentence length, organism and labels.

    Stored as ``cellcircuits.json`` beside the model weights; C2S defaults are used when the file is absent.
    """

    template: str = C2S_CELL_TYPE_TEMPLATE
    """Prompt template with the fields ``{num_genes}``, ``{organism}`` and ``{cell_sentence}``."""
    n_genes: int = 200
    """Genes kept from the top of each cell sentence when a prompt is built (C2S-Pythia used 200)."""
    organism: str = "Homo sapiens"
    """Organism named in the prompt."""
    labels: list[str] | None = None
    """Cell-type labels the model knows, used as candidates for prediction."""
    answer_prefix: str = " "
    """Text between the prompt and the label in the training text."""
    append_eos: bool = False
    """Whether the model was trained with an end-of-sequence token after the label (then it is scored)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata (training recipe, data set, measured accuracy)."""

    def __post_init__(self) -> None:
        for name in ("{num_genes}", "{organism}", "{cell_sentence}"):
            if name not in self.template:
                msg = f"prompt template lacks the field {name}: {self.template!r}"
                raise ValueError(msg)
        if int(self.n_genes) < 1:
            msg = f"n_genes must be a positive integer, got {self.n_genes!r}"
            raise ValueError(msg)
        if self.labels is not None:
            self.labels = [str(label) for label in self.labels]
            if len(set(self.labels)) != len(self.labels):
                msg = f"labels contain duplicates: {self.labels!r}"
                raise ValueError(msg)

    def to_json(self, path: str | Path) -> None:
        """Write the settings to a JSON file."""
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def from_json(cls, path: str | Path) -> PromptConfig:
        """Read settings written by :meth:`to_json`; unknown keys are an error."""
        data = json.loads(Path(path).read_text())
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            msg = f"{path}: unknown prompt settings {sorted(unknown)}"
            raise ValueError(msg)
        return cls(**data)

    @classmethod
    def from_dir(cls, directory: str | Path) -> PromptConfig:
        """Settings from ``directory/cellcircuits.json``, or C2S defaults when the file is absent."""
        path = Path(directory) / PROMPT_CONFIG_NAME
        return cls.from_json(path) if path.is_file() else cls()


class Prompt(NamedTuple):
    """A built prompt and where each of its genes stands in the text."""

    text: str
    """The prompt, ending right before the answer."""
    genes: list[str]
    """Genes of the sentence in prompt order (after the ``n_genes`` cut)."""
    gene_spans: list[tuple[int, int]]
    """Character span ``[start, end)`` of each gene in ``text``."""


def split_sentence(sentence: str) -> list[str]:
    """Genes of a cell sentence (space-separated symbols); an empty sentence gives no genes."""
    return sentence.split()


def build_prompt(sentence: str | list[str], config: PromptConfig) -> Prompt:
    """Build the cell-type prediction prompt of one cell sentence.

    Parameters
    ----------
    sentence
        A cell sentence (gene symbols joined by spaces, most expressed first) or its list of genes.
    config
        The model's prompt settings; the sentence is cut to ``config.n_genes`` genes.

    Returns
    -------
    The prompt text, its genes and each gene's character span.
    """
    genes = split_sentence(sentence) if isinstance(sentence, str) else list(sentence)
    genes = genes[: int(config.n_genes)]
    cell_sentence = " ".join(genes)
    marker = "\x00"  # locate the sentence without assuming where the template puts it
    head, tail = config.template.format(num_genes=len(genes), organism=config.organism, cell_sentence=marker).split(
        marker
    )
    spans = []
    pos = len(head)
    for gene in genes:
        spans.append((pos, pos + len(gene)))
        pos += len(gene) + 1
    return Prompt(head + cell_sentence + tail, genes, spans)


def answer_text(label: str, config: PromptConfig) -> str:
    """The text that follows a prompt when the model answers ``label``."""
    return config.answer_prefix + label
