"""Cell2Sentence prompt settings and prompt building (pure Python, no torch)."""

from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

#: Cell2Sentence single-cell cell-type prediction template 0. C2S draws one of 15 templates per cell; a fixed
#: one keeps the token positions of the template comparable between cells, which circuit tracing relies on.
C2S_CELL_TYPE_TEMPLATE = (
    "The following is a list of {num_genes} gene names ordered by descending expression level in a "
    "{organism} cell. Your task is to give the cell type which this cell belongs to based on its gene "
    "expression.\nCell sentence: {cell_sentence}.\nThe cell type corresponding to these genes is:"
)

#: File that stores :class:`PromptConfig` beside a model's weights.
PROMPT_CONFIG_NAME = "cellcircuits.json"

#: Fields a prompt template may hold; ``{cell_sentence}`` is required, the others optional.
TEMPLATE_FIELDS = ("num_genes", "organism", "cell_sentence")
ANSWER_TOKENIZATIONS = ("joint", "separate")


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names of a prompt template, in order; an error for a malformed template."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        msg = f"malformed prompt template ({err}): {template!r}"
        raise ValueError(msg) from None
    return [name for _, name, _, _ in parsed if name is not None]


@dataclass
class PromptConfig:
    """How a model was trained to read cells: its prompt template, sentence length, organism, labels and answer.

    Stored as ``cellcircuits.json`` beside the model weights. The defaults are the Cell2Sentence recipe for cell-type
    prediction (template 0, 200 genes, answer ``" {cell_type}."`` followed by the tokenizer's end-of-sequence token,
    the whole training text tokenized at once); :data:`cellcircuits.models.PRESETS` holds the settings of the public
    C2S checkpoints.
    """

    template: str = C2S_CELL_TYPE_TEMPLATE
    """Prompt template with the field ``{cell_sentence}`` and optionally ``{num_genes}`` and ``{organism}``."""
    n_genes: int = 200
    """Genes kept from the top of each cell sentence; ``{num_genes}`` is written as this count, as C2S does."""
    organism: str = "Homo sapiens"
    """Organism named in the prompt unless a tool is given another (``organism=``)."""
    labels: list[str] | None = None
    """Cell-type labels the model knows, used as candidates for prediction."""
    answer_prefix: str = " "
    """Text between the prompt and the label in the training text."""
    answer_suffix: str = "."
    """Text after the label in the training text (C2S answers ``"{cell_type}."``)."""
    append_eos: bool = True
    """Whether the answer ends with an end-of-answer token (then it is scored, and ends generation)."""
    eos_token: str | None = None
    """The end-of-answer token as the tokenizer spells it (``None``: the tokenizer's EOS token). Gemma-based
    checkpoints may end answers with ``"<eos>"`` or a control token such as ``"<end_of_turn>"``."""
    answer_tokenization: Literal["joint", "separate"] = "joint"
    """``"joint"``: prompt and answer tokenized as one text (cell2sentence's ``tokenize_all``); ``"separate"``: the
    answer ``answer_prefix + label + answer_suffix`` tokenized on its own and appended to the prompt's tokens
    (cell2sentence's ``tokenize_loss_on_response`` and the 2023 cell2sentence-ft recipe)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata (training recipe, data set, measured accuracy, the preset it came from)."""

    def __post_init__(self) -> None:
        fields = template_fields(self.template)
        unknown = sorted(set(fields) - set(TEMPLATE_FIELDS))
        if unknown:
            msg = f"prompt template has unknown fields {unknown} (known: {list(TEMPLATE_FIELDS)}): {self.template!r}"
            raise ValueError(msg)
        if fields.count("cell_sentence") != 1:
            msg = f"prompt template needs the field {{cell_sentence}} exactly once: {self.template!r}"
            raise ValueError(msg)
        if int(self.n_genes) < 1:
            msg = f"n_genes must be a positive integer, got {self.n_genes!r}"
            raise ValueError(msg)
        if self.answer_tokenization not in ANSWER_TOKENIZATIONS:
            msg = f"answer_tokenization must be one of {ANSWER_TOKENIZATIONS}, got {self.answer_tokenization!r}"
            raise ValueError(msg)
        if self.eos_token is not None and not str(self.eos_token):
            msg = "eos_token must be a token's text or None (the tokenizer's EOS)"
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
        """Read settings written by :meth:`to_json`; unknown keys are an error.

        A file that :meth:`to_json` wrote before the answer suffix existed (every field of that time, no
        ``answer_suffix``) describes a model trained without a suffix, and is read so; fields a hand-written file
        leaves out take the defaults.
        """
        data = json.loads(Path(path).read_text())
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            msg = f"{path}: unknown prompt settings {sorted(unknown)}"
            raise ValueError(msg)
        if "answer_suffix" not in data and {"answer_prefix", "append_eos", "extra"} <= set(data):
            data["answer_suffix"] = ""
        return cls(**data)

    @classmethod
    def from_dir(cls, directory: str | Path) -> PromptConfig | None:
        """Settings from ``directory/cellcircuits.json``; ``None`` when the file is absent."""
        path = Path(directory) / PROMPT_CONFIG_NAME
        return cls.from_json(path) if path.is_file() else None

    def describe(self) -> str:
        """One line naming the settings, for messages."""
        fields = template_fields(self.template)
        eos = f" + {self.eos_token or 'EOS'}" if self.append_eos else ""
        return (
            f"template {self.template[:40]!r}... (fields {fields}), n_genes={self.n_genes}, "
            f"organism={self.organism!r}, answer {self.answer_prefix + '{label}' + self.answer_suffix!r}{eos}, "
            f"{self.answer_tokenization} tokenization"
        )


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


def build_prompt(sentence: str | list[str], config: PromptConfig, organism: str | None = None) -> Prompt:
    """Build the cell-type prediction prompt of one cell sentence.

    Parameters
    ----------
    sentence
        A cell sentence (gene symbols joined by spaces, most expressed first) or its list of genes.
    config
        The model's prompt settings; the sentence is cut to ``config.n_genes`` genes, and ``{num_genes}`` is written
        as ``config.n_genes`` (as Cell2Sentence writes it, however many genes the cell has).
    organism
        Organism named in the prompt (``None``: ``config.organism``).

    Returns
    -------
    The prompt text, its genes and each gene's character span.
    """
    genes = split_sentence(sentence) if isinstance(sentence, str) else list(sentence)
    genes = genes[: int(config.n_genes)]
    cell_sentence = " ".join(genes)
    marker = "\x00"  # locate the sentence without assuming where the template puts it
    organism = config.organism if organism is None else str(organism)
    head, tail = config.template.format(num_genes=int(config.n_genes), organism=organism, cell_sentence=marker).split(
        marker
    )
    spans = []
    pos = len(head)
    for gene in genes:
        spans.append((pos, pos + len(gene)))
        pos += len(gene) + 1
    return Prompt(head + cell_sentence + tail, genes, spans)


def answer_text(label: str, config: PromptConfig) -> str:
    """The text that follows a prompt when the model answers ``label`` (before the end-of-answer token)."""
    return config.answer_prefix + label + config.answer_suffix
