"""Prompt settings of the public Cell2Sentence checkpoints, chosen by hub id or by name.

A checkpoint on the Hugging Face Hub carries no ``cellcircuits.json``; its preset says how it reads cells and how its
answers end. The settings below follow the recipe each checkpoint was released with (the cell2sentence package's
cell-type task for the 2024 and C2S-Scale models, the cell2sentence-ft templates for the 2023 model). They are not
read from the weights: check them once per checkpoint (tutorial 03, :func:`cellcircuits.models.compare_answer_formats`)
and pass ``preset=PromptConfig(...)`` to :func:`cellcircuits.models.load` when another format scores better.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..pp._prompts import C2S_CELL_TYPE_TEMPLATE, PromptConfig

#: First of the 2023 cell2sentence-ft prediction templates (instruction, sentence, answer lead-in; fixed "100 genes",
#: no organism). The model was trained on random pairs of 60 instructions and 18 lead-ins; a fixed pair keeps token
#: positions comparable between cells.
C2S_FT_PREDICTION_TEMPLATE = (
    "Identify the cell type most likely associated with these 100 highly expressed genes listed in descending "
    "order. {cell_sentence} This is the cell type corresponding to these genes: "
)


@dataclass(frozen=True)
class Preset:
    """Prompt settings of a public checkpoint and the hub ids that select them."""

    name: str
    """Name to pass as ``preset=``."""
    hub_ids: tuple[str, ...]
    """Hugging Face Hub ids the preset applies to (matched case-insensitively)."""
    prompt: PromptConfig
    """The settings."""
    description: str
    """What the checkpoint is and where its settings come from."""

    def config(self) -> PromptConfig:
        """A fresh copy of the settings, recording the preset's name in ``extra["preset"]``."""
        return dataclasses.replace(self.prompt, extra={**self.prompt.extra, "preset": self.name})


_C2S_2024 = PromptConfig(template=C2S_CELL_TYPE_TEMPLATE, n_genes=200, answer_suffix=".", append_eos=True)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "c2s-pythia-410m-cell-type-prediction",
            ("vandijklab/C2S-Pythia-410m-cell-type-prediction",),
            _C2S_2024,
            "C2S-Pythia-410m (GPT-NeoX, 24 layers) fine-tuned for cell-type prediction with the cell2sentence "
            "package: template 0, 200 genes, answer ' {cell_type}.' + <|endoftext|>.",
        ),
        Preset(
            "c2s-scale-pythia-1b",
            ("vandijklab/C2S-Scale-Pythia-1b-pt",),
            _C2S_2024,
            "C2S-Scale-Pythia-1b (GPT-NeoX, 16 layers), multi-task pretrained; cell-type task in the cell2sentence "
            "format: template 0, 200 genes, answer ' {cell_type}.' + <|endoftext|>.",
        ),
        Preset(
            "c2s-scale-gemma-2-2b",
            ("vandijklab/C2S-Scale-Gemma-2-2B",),
            _C2S_2024,
            "C2S-Scale-Gemma-2-2B (Gemma-2, 26 layers); cell-type task in the cell2sentence format: template 0, "
            "200 genes, answer ' {cell_type}.' + <eos> (check '<end_of_turn>' with compare_answer_formats).",
        ),
        Preset(
            "c2s-scale-gemma-2-27b",
            ("vandijklab/C2S-Scale-Gemma-2-27B",),
            _C2S_2024,
            "C2S-Scale-Gemma-2-27B (Gemma-2, 46 layers); cell-type task in the cell2sentence format: template 0, "
            "200 genes, answer ' {cell_type}.' + <eos> (check '<end_of_turn>' with compare_answer_formats).",
        ),
        Preset(
            "pythia-160m-c2s",
            ("vandijklab/pythia-160m-c2s",),
            PromptConfig(
                template=C2S_FT_PREDICTION_TEMPLATE,
                n_genes=100,
                answer_prefix="",
                answer_suffix="",
                append_eos=True,
                answer_tokenization="separate",
            ),
            "The 2023 cell2sentence-ft model (Pythia-160m, 12 layers): 100-gene prompts without organism, the label "
            "tokenized on its own after the prompt's trailing space, + <|endoftext|>.",
        ),
    )
}


def preset_for(name: str) -> Preset | None:
    """The preset of a hub id (``"vandijklab/C2S-Pythia-410m-cell-type-prediction"``) or a preset name."""
    key = name.strip().rstrip("/").lower()
    for preset in PRESETS.values():
        if key == preset.name or key in (h.lower() for h in preset.hub_ids):
            return preset
    return None


def get_preset(name: str) -> PromptConfig:
    """The prompt settings of a preset, by preset name or hub id.

    Parameters
    ----------
    name
        A key of :data:`PRESETS` (``"c2s-scale-gemma-2-2b"``) or a hub id one of them serves.

    Returns
    -------
    A fresh :class:`~cellcircuits.pp.PromptConfig`, with ``extra["preset"]`` naming the preset.

    Raises
    ------
    KeyError
        For an unknown name, listing the presets.
    """
    preset = preset_for(name)
    if preset is None:
        msg = f"No preset {name!r}; presets are {sorted(PRESETS)} (or their hub ids)."
        raise KeyError(msg)
    return preset.config()
