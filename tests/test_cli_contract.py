"""The command line's promises: exit 0 on success, 2 with one ``error:`` line naming the argument, before any work
and without output, for a bad argument; 130 when interrupted; an output replaced whole or not at all.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

import cellcircuits as cc
from cellcircuits.cli import main


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of the command line run in-process."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse refuses an argument by exiting
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_error_line(err: str, flag: str) -> None:
    """``err`` is one line, ``error: <flag> ...`` (or ``error: <flag>: ...``)."""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("error: "), err
    assert err.split()[1].rstrip(":;") == flag, err


def leftovers(folder: Path) -> list[str]:
    """Hidden files beside the outputs: temporary outputs, probes, renamed-aside old outputs."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def model():
    return cc.models.load("pbmc68k-genes", device="cpu")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, model) -> dict[str, Path]:
    """A 12-cell .h5ad of two labelled cell types, tiny transcoders for it, and some files that are not .h5ad."""
    folder = tmp_path_factory.mktemp("inputs")
    adata = cc.ds.pbmc68k()
    keep = np.concatenate([np.flatnonzero(adata.obs["bulk_labels"] == g)[:6] for g in ("CD14+ Monocyte", "CD19+ B")])
    small = adata[keep].copy()
    small.write_h5ad(folder / "small.h5ad")
    tset = cc.tl.train_transcoders(small, model, n_tokens=2000, n_features=64, k=4, progress=False)
    tset.save(folder / "tc")
    (folder / "text.h5ad").write_text("cell,type\n")
    (folder / "truncated.h5ad").write_bytes((folder / "small.h5ad").read_bytes()[:4000])
    return {
        "adata": folder / "small.h5ad",
        "tc": folder / "tc",
        "text": folder / "text.h5ad",
        "truncated": folder / "truncated.h5ad",
    }


@pytest.fixture
def no_work(monkeypatch):
    """Every step that computes fails the test when called: refusals must come before any work."""

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    for name in (
        "cellcircuits._pipeline.run_pipeline",
        "cellcircuits._pipeline.train_for",
        "cellcircuits.tl.predict_cell_types",
        "cellcircuits.tl.transcode",
        "cellcircuits.tl.trace_circuit",
        "cellcircuits.pp.cell_sentences",
    ):
        monkeypatch.setattr(name, forbidden)


A, T = "{adata}", "{tc}"
TRACE = ["trace", "--adata", A, "--transcoders", T, "--groupby", "bulk_labels"]
BAD_ARGUMENTS = {
    "adata-not-h5ad": (["predict", "--adata", "{text}"], "--adata"),
    "adata-truncated": (["predict", "--adata", "{truncated}"], "--adata"),
    "adata-missing": (["sentences", "--adata", "{missing}"], "--adata"),
    "trace-groups-unknown": ([*TRACE, "--groups", "Martian"], "--groups"),
    "trace-target-unknown": ([*TRACE, "--target", "Martian"], "--target"),
    "trace-n-cells-0": ([*TRACE, "--n-cells", "0"], "--n-cells"),
    "trace-no-groupby": (["trace", "--adata", A, "--transcoders", T], "--groupby"),
    "transcode-layer-beyond-model": (["transcode", "--adata", A, "--transcoders", T, "--layers", "7"], "--layers"),
    "transcode-negative-layer": (["transcode", "--adata", A, "--transcoders", T, "--layers", "-1"], "--layers"),
    "train-layer-beyond-model": (["train-transcoders", "--adata", A, "--layers", "0", "7"], "--layers"),
    "train-negative-layer": (["train-transcoders", "--adata", A, "--layers", "-1"], "--layers"),
    "batch-size-0": (["predict", "--adata", A, "--batch-size", "0"], "--batch-size"),
    "threads-negative": (["predict", "--adata", A, "--threads", "-1"], "--threads"),
    "threads-not-integer": (["predict", "--adata", A, "--threads", "two"], "--threads"),
    "n-genes-0": (["sentences", "--adata", A, "--n-genes", "0"], "--n-genes"),
    "layer-not-in-data": (["sentences", "--adata", A, "--layer", "counts"], "--layer"),
    "gene-symbols-not-in-var": (["sentences", "--adata", A, "--gene-symbols", "symbol"], "--gene-symbols"),
    "n-tokens-negative": (["train-transcoders", "--adata", A, "--n-tokens", "-5"], "--n-tokens"),
    "n-tokens-0": (["train-transcoders", "--adata", A, "--n-tokens", "0"], "--n-tokens"),
    "run-n-tokens-0": (["run", "--n-tokens", "0"], "--n-tokens"),
    "run-groups-unknown": (["run", "--adata", A, "--groupby", "bulk_labels", "--groups", "Martian"], "--groups"),
    "run-groups-not-labels": (["run", "--adata", A, "--groupby", "phase", "--transcoders", T], "--groupby"),
    "run-groupby-missing": (["run", "--adata", A, "--groupby", "cell_type"], "--groupby"),
    "out-under-a-file": (["predict", "--adata", A, "--out", "{text}/p.h5ad"], "--out"),
    "device-without-cuda": (["predict", "--adata", A, "--device", "cuda"], "--device"),
}


@pytest.mark.parametrize(("argv", "flag"), list(BAD_ARGUMENTS.values()), ids=list(BAD_ARGUMENTS))
def test_bad_argument_is_one_error_line_and_status_2(argv, flag, inputs, tmp_path, capsys, no_work):
    if flag == "--device" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    names = {k: str(v) for k, v in inputs.items()} | {"missing": str(tmp_path / "missing.h5ad")}
    argv = [a.format(**names) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    status, _, err = cli([*argv, "--quiet"], capsys)
    assert status == 2
    assert_one_error_line(err, flag)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary left behind


@pytest.fixture
def readonly(tmp_path, monkeypatch) -> Path:
    """A folder in which nothing can be created (simulated: the tests may run as root, who may write anywhere)."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    mkdir, open_ = os.mkdir, os.open

    def refuse(path) -> None:
        if Path(os.fsdecode(path)).absolute().parent == folder:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))

    monkeypatch.setattr(os, "mkdir", lambda path, *a, **k: (refuse(path), mkdir(path, *a, **k))[1])
    monkeypatch.setattr(os, "open", lambda path, *a, **k: (refuse(path), open_(path, *a, **k))[1])
    return folder


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "--adata", A, "--out", "{ro}/pred.h5ad"],
        ["train-transcoders", "--adata", A, "--n-tokens", "100", "--out", "{ro}/tc"],
        [*TRACE, "--n-cells", "1", "--out", "{ro}/nested/circuits"],
    ],
    ids=["predict", "train-transcoders", "trace"],
)
def test_unwritable_out_is_refused_before_any_work(argv, inputs, readonly, capsys, no_work):
    names = {k: str(v) for k, v in inputs.items()} | {"ro": str(readonly)}
    status, _, err = cli([*(a.format(**names) for a in argv), "--quiet"], capsys)
    assert status == 2
    assert_one_error_line(err, "--out")
    assert "cannot be written" in err
    assert list(readonly.iterdir()) == []


def test_run_groups_checked_before_any_work(inputs, model, tmp_path):
    """The pipeline itself refuses groups it cannot trace before it writes anything."""
    from cellcircuits._pipeline import run_pipeline

    adata, tset = ad.read_h5ad(inputs["adata"]), cc.load_transcoders(inputs["tc"])
    with pytest.raises(ValueError, match="no group to trace"):
        run_pipeline(
            adata, model, tmp_path / "out", groupby="bulk_labels", groups=["Martian"], transcoders=tset,
            progress=False, log=lambda _msg: None,
        )  # fmt: skip
    assert not (tmp_path / "out").exists()
    assert "c2s_cell_type" not in adata.obs


def test_pipeline_splits_fall_back_to_all_cells(inputs):
    """Data whose ``split`` column has no ``test`` cells is evaluated on all of them, not on none after training."""
    from cellcircuits._pipeline import split_cells

    adata = ad.read_h5ad(inputs["adata"])
    assert set(adata.obs["split"]) == {"train"}
    assert split_cells(adata, "test") is adata
    adata.obs["split"] = ["test", "train"] * 6
    assert split_cells(adata, "test").n_obs == 6


def fake_pipeline(written: list[str], fail: BaseException | None = None):
    """A stand-in for run_pipeline that writes two results (and then fails, when given ``fail``)."""

    def run_pipeline(adata, model, out, **kwargs):
        (out / "circuits").mkdir(parents=True)
        (out / "circuits" / "CD19_B.json").write_text("{}")
        written.append(str(out))
        if fail is not None:
            raise fail
        adata.write_h5ad(out / "adata.h5ad")
        return {"accuracy": 0.5, "groups_traced": ["CD19+ B"], "transcoders": "given"}

    return run_pipeline


@pytest.fixture
def old_run(tmp_path) -> Path:
    """The output of an earlier run: a circuit no longer traced, a report, an h5ad."""
    out = tmp_path / "results"
    (out / "circuits").mkdir(parents=True)
    (out / "circuits" / "Stale.json").write_text('{"old": true}')
    (out / "report.html").write_text("<html>old</html>")
    (out / "adata.h5ad").write_text("old")
    return out


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


RUN = ["run", "--adata", A, "--groupby", "bulk_labels", "--groups", "CD19+ B", "--transcoders", T, "--quiet"]


def test_overwrite_replaces_a_directory_output_whole(inputs, old_run, monkeypatch, capsys):
    written: list[str] = []
    monkeypatch.setattr("cellcircuits._pipeline.run_pipeline", fake_pipeline(written))
    argv = [a.format(adata=inputs["adata"], tc=inputs["tc"]) for a in RUN]
    status, out, _ = cli([*argv, "--out", old_run, "--overwrite"], capsys)
    assert status == 0 and f"wrote {old_run}" in out
    assert Path(written[0]).parent == old_run.parent and Path(written[0]) != old_run  # built beside it
    assert sorted(tree(old_run)) == ["adata.h5ad", "circuits/CD19_B.json"]  # no stale circuit, no old report
    assert ad.read_h5ad(old_run / "adata.h5ad").n_obs == 12
    umask = os.umask(0)
    os.umask(umask)
    assert old_run.stat().st_mode & 0o777 == 0o777 & ~umask  # not the private mode of a temporary directory
    assert leftovers(old_run.parent) == []


def test_overwrite_replaces_transcoders_whole(inputs, tmp_path, capsys):
    out = tmp_path / "tc"
    (out / "layer_3").mkdir(parents=True)
    (out / "layer_3" / "stale.txt").write_text("old")
    argv = ["train-transcoders", "--adata", inputs["adata"], "--layers", "0", "--n-tokens", "500", "--quiet"]
    status, _, _ = cli([*argv, "--out", out, "--overwrite"], capsys)
    assert status == 0
    assert not (out / "layer_3").exists()
    assert cc.load_transcoders(out).layers == [0]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["error", "interrupt"])
def test_failed_run_leaves_the_old_output_as_it_was(kind, inputs, old_run, monkeypatch, capsys):
    before = tree(old_run)
    written: list[str] = []
    fail = RuntimeError("a step failed") if kind == "error" else KeyboardInterrupt()
    monkeypatch.setattr("cellcircuits._pipeline.run_pipeline", fake_pipeline(written, fail))
    argv = [*(a.format(adata=inputs["adata"], tc=inputs["tc"]) for a in RUN), "--out", old_run, "--overwrite"]
    if kind == "error":
        with pytest.raises(RuntimeError, match="a step failed"):
            main([str(a) for a in argv])
    else:
        status, _, err = cli(argv, capsys)
        assert status == 130
        assert_one_error_line(err, "interrupted")
    assert written  # the run got as far as writing
    assert tree(old_run) == before
    assert leftovers(old_run.parent) == []


@pytest.fixture
def old_prediction(inputs, tmp_path) -> Path:
    out = tmp_path / "pred.h5ad"
    out.write_bytes(inputs["adata"].read_bytes())
    return out


def test_interrupt_while_writing_h5ad_keeps_the_old_file(inputs, old_prediction, monkeypatch, capsys):
    def interrupted_write(self, filename, *args, **kwargs):
        Path(filename).write_text("half an h5ad")
        raise KeyboardInterrupt

    monkeypatch.setattr(ad.AnnData, "write_h5ad", interrupted_write)
    before = old_prediction.read_bytes()
    argv = ["predict", "--adata", inputs["adata"], "--out", old_prediction, "--overwrite", "--quiet"]
    status, _, err = cli(argv, capsys)
    assert status == 130
    assert_one_error_line(err, "interrupted")
    assert old_prediction.read_bytes() == before
    assert leftovers(old_prediction.parent) == []


def test_interrupt_swallowed_by_the_writer_is_still_an_interrupt(inputs, old_prediction, monkeypatch, capsys):
    """A SIGINT that the h5ad writer catches and ignores still stops the run before the output is replaced."""
    write = ad.AnnData.write_h5ad

    def swallowing_write(self, filename, *args, **kwargs):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass
        write(self, filename, *args, **kwargs)

    monkeypatch.setattr(ad.AnnData, "write_h5ad", swallowing_write)
    before = old_prediction.read_bytes()
    # Python's own handler, or SIG_IGN where the runner started the tests in the background without job control
    handler = signal.getsignal(signal.SIGINT)
    argv = ["predict", "--adata", inputs["adata"], "--out", old_prediction, "--overwrite", "--quiet"]
    status, _, err = cli(argv, capsys)
    assert status == 130
    assert_one_error_line(err, "interrupted")
    assert old_prediction.read_bytes() == before
    assert leftovers(old_prediction.parent) == []
    assert signal.getsignal(signal.SIGINT) is handler  # the handler is put back


def test_failed_write_of_a_file_output_keeps_the_old_file(inputs, old_prediction, monkeypatch):
    def failing_write(self, filename, *args, **kwargs):
        Path(filename).write_text("half an h5ad")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", failing_write)
    before = old_prediction.read_bytes()
    argv = ["sentences", "--adata", inputs["adata"], "--out", old_prediction, "--overwrite"]
    with pytest.raises(OSError, match="No space left"):
        main([str(a) for a in argv])
    assert old_prediction.read_bytes() == before
    assert leftovers(old_prediction.parent) == []


def test_file_output_is_replaced_and_readable(inputs, old_prediction, capsys):
    status, out, _ = cli(
        ["sentences", "--adata", inputs["adata"], "--n-genes", "5", "--out", old_prediction, "--overwrite"], capsys
    )
    assert status == 0 and "wrote 12 cell sentences" in out
    assert ad.read_h5ad(old_prediction).obs["cell_sentence"].str.split().map(len).max() == 5
    assert leftovers(old_prediction.parent) == []


@pytest.mark.slow
def test_real_run_overwrite_leaves_no_stale_results(inputs, old_run, capsys):
    argv = [a.format(adata=inputs["adata"], tc=inputs["tc"]) for a in RUN]
    status, _, _ = cli([*argv, "--n-cells", "1", "--out", old_run, "--overwrite"], capsys)
    assert status == 0
    assert not (old_run / "circuits" / "Stale.json").exists()
    assert sorted(p.name for p in (old_run / "circuits").iterdir()) == ["CD19_B.graphml", "CD19_B.json"]
    assert json.loads((old_run / "summary.json").read_text())["groups_traced"] == ["CD19+ B"]
    assert "old" not in (old_run / "report.html").read_text()[:100]
    assert leftovers(old_run.parent) == []
