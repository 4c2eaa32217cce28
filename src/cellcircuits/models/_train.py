"""Training a small Cell2Sentence-style GPT-NeoX model (and its BPE tokenizer) from scratch."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..pp._prompts import PromptConfig, answer_text, build_prompt
from ._adapter import ModelAdapter
from ._gene_vocab import add_gene_words, check_gene_vocab, gene_word_pre_tokenizer, words_without_genes
from ._load import C2SModel
from ._scoring import pad

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from transformers import PreTrainedTokenizerFast

EOS, PAD = "<|endoftext|>", "<|padding|>"  # the GPT-NeoX/Pythia special tokens


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, gene_vocab: Sequence[str] | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (the GPT-NeoX kind) on ``texts``, optionally with genes as single tokens.

    A small vocabulary keeps gene symbols split into several tokens, as C2S-Pythia's 50k-token vocabulary does. With
    ``gene_vocab``, every gene of it becomes one token where it stands as a word of a cell sentence (after a space,
    before a space or the sentence's final ``"."``): the pre-tokenizer keeps whitespace-delimited words whole, the
    BPE is trained on the words that are not genes (so its merges spell the template and the labels), and each
    gene's word is added to the vocabulary as one entry that bypasses the merges. Other text (the template, labels
    such as ``"CD14+ Monocyte"``, genes outside ``gene_vocab``) is spelled by the byte-level BPE; a gene symbol
    inside a longer word (``CD1`` in ``CD14``, ``CD14`` in ``CD14+``) is not matched. A gene is one token after a
    space, as every gene of a C2S prompt stands; at the very start of a text it is spelled by the BPE.

    Parameters
    ----------
    texts
        Training texts (full prompts with answers).
    vocab_size
        Vocabulary size of the BPE, including the 256 byte tokens and the special tokens; the genes of
        ``gene_vocab`` come on top of it.
    gene_vocab
        Gene symbols to make single tokens; ``None`` (default) keeps the plain byte-level BPE.

    Returns
    -------
    A fast tokenizer with GPT-NeoX's ``<|endoftext|>`` (BOS/EOS) and ``<|padding|>`` tokens.

    Raises
    ------
    ValueError
        When ``gene_vocab`` is empty or holds a symbol that cannot be one word of a cell sentence (empty, with
        whitespace, or ending in ``.,:;!?``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    genes = None if gene_vocab is None else check_gene_vocab(gene_vocab)
    tok = Tokenizer(models.BPE())
    if genes is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = gene_word_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts if genes is None else words_without_genes(texts, genes), trainer)
    if genes is not None:
        tok = add_gene_words(tok, genes)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=PAD)


def training_texts(sentences: Sequence[str], labels: Sequence[str], config: PromptConfig) -> list[tuple[str, str]]:
    """``(prompt, answer)`` pairs of the full training texts."""
    return [(build_prompt(s, config).text, answer_text(y, config)) for s, y in zip(sentences, labels, strict=True)]


def encode_examples(
    tokenizer: PreTrainedTokenizerFast, pairs: Sequence[tuple[str, str]], append_eos: bool
) -> list[tuple[list[int], int]]:
    """Token ids of each prompt+answer and the index where the answer starts."""
    prompts = tokenizer([p for p, _ in pairs])["input_ids"]
    answers = tokenizer([a for _, a in pairs], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if append_eos else []
    return [(p + a + eos, len(p)) for p, a in zip(prompts, answers, strict=True)]


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted next-token cross-entropy; ``weights[:, t]`` weighs the prediction of token ``t``."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    w = weights[:, 1:]
    return (nll * w).sum() / w.sum()


def train_c2s(
    sentences: Sequence[str] | Callable[[int], Sequence[str]],
    labels: Sequence[str],
    *,
    classes: Sequence[str] | None = None,
    n_genes: int = 100,
    organism: str = "Homo sapiens",
    answer_suffix: str = ".",
    n_layers: int = 4,
    d_model: int = 128,
    n_heads: int = 4,
    d_mlp: int | None = None,
    vocab_size: int = 512,
    gene_vocab: Sequence[str] | None = None,
    epochs: int = 30,
    batch_size: int = 16,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    dropout: float = 0.1,
    answer_weight: float = 10.0,
    seed: int = 0,
    device: str | torch.device | None = None,
    output_dir: str | Path | None = None,
    metadata: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> C2SModel:
    """Train a small Cell2Sentence-style GPT-NeoX model and its tokenizer from scratch on cell sentences.

    Each cell becomes the full C2S text: the cell-type prediction prompt with its sentence (cut to ``n_genes``)
    followed by its answer in the C2S format (``" " + label + answer_suffix``) and an end-of-sequence token. The
    model learns next-token prediction over the whole text, the label tokens weighted by ``answer_weight``. A
    byte-level BPE tokenizer with a small vocabulary is trained first, so gene symbols are split into several tokens,
    as in C2S-Pythia, unless ``gene_vocab`` names genes to make single tokens (:func:`train_tokenizer`). From an
    AnnData, use :func:`cellcircuits.tl.train_c2s`.

    Parameters
    ----------
    sentences
        The cells' sentences (gene symbols, most expressed first), or a function of the epoch returning them: it is
        called for every epoch, so the random order of equally expressed genes can be redrawn (C2S breaks ties at
        random), which teaches the model that the order within ties carries no information.
    labels
        Each cell's cell-type label.
    classes
        The labels the model knows, in order; default the sorted distinct ``labels``.
    n_genes
        Genes per cell sentence; recorded with the model and used for every prompt built for it.
    organism
        Organism named in the prompt.
    answer_suffix
        Text after the label in the answer: ``"."`` as in Cell2Sentence (the shipped model was trained with ``""``).
    n_layers, d_model, n_heads, d_mlp
        Model shape; ``d_mlp`` defaults to ``4 * d_model``.
    vocab_size
        Size of the BPE vocabulary.
    gene_vocab
        Gene symbols the tokenizer spells as single tokens in cell sentences, on top of the BPE vocabulary (every
        gene a sentence can hold, so each gene is one position of the prompt); ``None``: genes are spelled by the
        BPE alone.
    epochs, batch_size, lr, weight_decay, dropout
        Optimisation (AdamW, linear warm-up then cosine decay); ``dropout`` applies to the residual branches.
    answer_weight
        Weight of the label tokens in the loss relative to the sentence tokens.
    seed
        Seeds the weights and batches; training on CPU is deterministic for a seed.
    device
        Training device; default CUDA when available, else CPU.
    output_dir
        Save the trained model there (safetensors, tokenizer, ``cellcircuits.json``).
    metadata
        Extra entries recorded in the model's ``cellcircuits.json`` (e.g. where the labels came from).
    progress
        Show a progress bar with the loss.

    Returns
    -------
    The trained model, ready for :func:`cellcircuits.tl.predict_cell_types`.

    Raises
    ------
    TypeError
        When ``sentences`` is an AnnData (use :func:`cellcircuits.tl.train_c2s`).
    ValueError
        When ``labels`` and ``sentences`` differ in length, there are fewer than two classes, or ``gene_vocab``
        is empty or holds a symbol that cannot be one word of a cell sentence.
    """
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    if hasattr(sentences, "obs") and hasattr(sentences, "var_names"):
        msg = (
            "cellcircuits.models.train_c2s takes cell sentences and labels; to train from an AnnData use "
            "cellcircuits.tl.train_c2s(adata, label_key, ...)."
        )
        raise TypeError(msg)
    labels = [str(y) for y in labels]
    resample_ties = callable(sentences)
    first_sentences = list(sentences(0) if callable(sentences) else sentences)
    if len(first_sentences) != len(labels):
        msg = f"{len(first_sentences)} sentences for {len(labels)} labels"
        raise ValueError(msg)
    classes = sorted(set(labels)) if classes is None else [str(c) for c in classes]
    if len(classes) < 2:
        msg = "fewer than two labels; nothing to learn."
        raise ValueError(msg)
    genes = None if gene_vocab is None else check_gene_vocab(gene_vocab)
    config = PromptConfig(
        n_genes=n_genes, organism=organism, labels=classes, answer_suffix=answer_suffix, append_eos=True
    )

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    first = training_texts(first_sentences, labels, config)
    tokenizer = train_tokenizer((p + a for p, a in first), vocab_size=vocab_size, gene_vocab=genes)
    examples = encode_examples(tokenizer, first, config.append_eos)
    max_len = max(len(ids) for ids, _ in examples)
    # rotary_pct is a named argument in transformers 4.x and a legacy keyword (read into rope_parameters) in 5.x
    legacy_kwargs: dict[str, Any] = {"rotary_pct": 0.25}
    hf_config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        intermediate_size=d_mlp or 4 * d_model,
        # room for longer sentences than seen in training; rotary positions extrapolate poorly, so not much more
        max_position_embeddings=2 ** math.ceil(math.log2(max_len * 2)),
        use_parallel_residual=True,
        hidden_dropout=dropout,
        attention_dropout=0.0,  # dropout inside attention pushes SDPA onto a path ~3x slower on CPU
        tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **legacy_kwargs,
    )
    device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    model = GPTNeoXForCausalLM(hf_config)
    module: torch.nn.Module = model  # PreTrainedModel.to is typed through @wraps, which hides its binding
    module.to(device)  # in place, as Module.to is
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))
    )
    history = []
    model.train()
    with tqdm(total=total, desc="training C2S model", disable=not progress) as bar:
        for epoch in range(epochs):
            if epoch > 0 and callable(sentences):
                examples = encode_examples(tokenizer, training_texts(sentences(epoch), labels, config), True)
            losses = []
            for b in range(steps_per_epoch):
                batch = [examples[i] for i in rng.permutation(len(examples))[b * batch_size : (b + 1) * batch_size]]
                ids, mask = pad([e[0] for e in batch], tokenizer.pad_token_id, "right")
                weights = mask.float()
                for row, (_, start) in enumerate(batch):
                    weights[row, start:] *= answer_weight
                ids, mask, weights = ids.to(device), mask.to(device), weights.to(device)
                logits = model(input_ids=ids, attention_mask=mask).logits
                loss = lm_loss(logits, ids, weights)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses):.3f}")
            history.append(float(np.mean(losses)))
    model.eval()
    config.extra = {
        "trained_by": "cellcircuits.models.train_c2s",
        **(metadata or {}),
        "n_train_cells": len(labels),
        "loss_history": history,
        "hyperparameters": {
            "n_layers": n_layers,
            "d_model": d_model,
            "n_heads": n_heads,
            "d_mlp": d_mlp or 4 * d_model,
            "vocab_size": vocab_size,
            "gene_tokens": len(genes or []),
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "dropout": dropout,
            "answer_weight": answer_weight,
            "resample_ties": resample_ties,
            "seed": seed,
        },
    }
    c2s = C2SModel(model=model, tokenizer=tokenizer, adapter=ModelAdapter(model), prompt=config, name="train_c2s")
    if output_dir is not None:
        c2s.save(output_dir)
        c2s.name = str(output_dir)
    return c2s
