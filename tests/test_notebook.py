"""The walkthrough notebook runs top to bottom (so it never rots), draws every figure it makes,
and is stored without outputs."""

from __future__ import annotations

import re

import nbformat
import pytest

from conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "ViT.ipynb"
# A cell draws when it shows a matplotlib figure or displays an image file.
DRAWS = re.compile(r"(?<!def )\bshow\(|display\(Image\(")


def code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_notebook_is_stored_without_outputs():
    code = code_cells(nbformat.read(NOTEBOOK, as_version=4))
    assert code, "the notebook has no code cells"
    assert all(not c.outputs and c.execution_count is None for c in code)


def test_the_drawing_cells_are_found():
    drawing = [
        c for c in code_cells(nbformat.read(NOTEBOOK, as_version=4)) if DRAWS.search(c.source)
    ]
    # samples, patches, training curves, the report, attention maps
    assert len(drawing) >= 5
    assert any("attention_viz" in c.source for c in drawing)


# The notebook's parameters for the test: one training epoch, as papermill would inject them.
TEST_PARAMETERS = "EPOCHS = 1"
# Run right after the training cell: the kernel's pyplot backend (inline) and the plots the
# training drew, for test_training_leaves_matplotlib_backend_alone.
AFTER_TRAINING = """import matplotlib
print("backend:", matplotlib.get_backend())
print("plots:", sorted(p.name for p in (WORK / "results").glob("*.png")))"""


def is_training(cell) -> bool:
    return cell.cell_type == "code" and cell.source.startswith("import train\n")


def with_test_parameters(nb):
    """nb with a cell setting TEST_PARAMETERS right after its `parameters` cell, and the
    AFTER_TRAINING cell right after its training cell."""
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "the notebook needs one cell tagged `parameters`"
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(TEST_PARAMETERS))
    training = [i for i, c in enumerate(nb.cells) if is_training(c)]
    assert len(training) == 1, "the notebook needs one cell starting `import train`"
    nb.cells.insert(training[0] + 1, nbformat.v4.new_code_cell(AFTER_TRAINING))
    return nb


@pytest.fixture(scope="module")
def executed():
    from nbclient import NotebookClient

    nb = with_test_parameters(nbformat.read(NOTEBOOK, as_version=4))
    NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    ).execute()
    return nb


@pytest.mark.slow
def test_notebook_executes_without_errors(executed):
    outputs = [o for c in code_cells(executed) for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # The injected parameter reached the training run: one epoch, not the stored eight.
    training = next(c for c in code_cells(executed) if is_training(c))
    log = "".join(o.get("text", "") for o in training.outputs if o.output_type == "stream")
    assert re.findall(r"^epoch +(\d+) ", log, re.M) == ["1"], log[-2000:]


@pytest.mark.slow
def test_every_drawing_cell_shows_an_image(executed):
    """The attention cell comes after the training run, which once switched matplotlib to Agg
    inside the kernel, so its figure was never shown; the cells before it still were."""
    for cell in code_cells(executed):
        if DRAWS.search(cell.source):
            images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
            first_line = cell.source.splitlines()[0]
            assert images, f"the cell starting `{first_line}` drew no image"


@pytest.mark.slow
def test_training_leaves_matplotlib_backend_alone(executed):
    """The root of the notebook's blank attention cell: library code that plots must not switch
    the caller's pyplot backend. Checked in the executed notebook's own kernel (a fresh
    process that chose inline before importing train), right after the training cell."""
    cells = code_cells(executed)
    after = cells[next(i for i, c in enumerate(cells) if is_training(c)) + 1]
    assert after.source == AFTER_TRAINING
    out = "".join(o.get("text", "") for o in after.outputs if o.output_type == "stream")
    assert "plots: ['accuracy_loss.png'" in out, f"training drew no plot: nothing was tested\n{out}"
    # "inline", or "module://matplotlib_inline.backend_inline" on older matplotlib
    assert re.search(r"^backend: .*inline$", out, re.M), out
