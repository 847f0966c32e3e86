"""Executes every notebook in notebooks/ at reduced size (HFJAX_NOTEBOOK_SCALE=small)."""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
  assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "paper_ablation", "flax_nnx"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
  notebook = nbformat.read(path, as_version=4)
  assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
    "commit notebooks with their outputs cleared"
  )
  # The kernel inherits this environment; it runs in tmp_path, so runs/ lands there.
  monkeypatch.setenv("HFJAX_NOTEBOOK_SCALE", "small")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  client = nbclient.NotebookClient(
    notebook,
    timeout=300,
    kernel_name="python3",
    resources={"metadata": {"path": str(tmp_path)}},
  )
  client.execute()
  errors = [
    output
    for cell in notebook.cells
    if cell.cell_type == "code"
    for output in cell.outputs
    if output.output_type == "error"
  ]
  assert not errors
