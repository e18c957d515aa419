"""`main.ipynb` stays a client of the package, and it runs: executed headless with `SMOKE = True`.

The static checks (parameters cell, cleared outputs, no function or class defined in a cell) always
run. The execution reads the course's data from `$SHARED_DATA_DIR` (as CI does) and is skipped
without it, since it would otherwise download it; it is also skipped inside a run of the notebook
itself, which sets `MAIN_IPYNB_RUNNING` before its unit-test cell starts `python -m unittest`.
Parameters are injected as papermill does: a cell tagged `injected-parameters` right after the
one tagged `parameters`. Logs, data and report go to a temporary folder, never into the checkout.
"""
import ast
import os
import tempfile
import unittest
from unittest import mock

import nbformat

from tests.helpers import slow
from utils.cli import shared_data_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "main.ipynb")
REQUIRED_PARAMETERS = ("SMOKE", "EXP_ID", "EPOCHS")
RUNNING_FLAG = "MAIN_IPYNB_RUNNING"  # set by the notebook's set-up cell
CELL_TIMEOUT_S = 600  # a SMOKE run takes a few minutes in all; a cell stuck this long is a hang
# nbclient waits 4 s by default for a cell's last outputs after its reply, then drops them with a
# warning (a figure lost on a busy machine), and 60 s for the kernel to start. Both waits end as
# soon as the kernel is there.
IOPUB_TIMEOUT_S, STARTUP_TIMEOUT_S = 120, 300
DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def code_cells(notebook):
    return [(index, cell) for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"]


def parameters_index(notebook):
    """Index of the one code cell tagged `parameters` (AssertionError when not exactly one)."""
    tagged = [index for index, cell in code_cells(notebook)
              if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one code cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def python_source(cell):
    """The cell's source as plain Python: IPython's `!command` lines become function calls."""
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(cell.source)


def assigned_values(source):
    """name -> value of each `NAME = literal` at the top level of `source` (None if not a literal)."""
    values = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    try:
                        values[target.id] = ast.literal_eval(node.value)
                    except ValueError:
                        values[target.id] = None
    return values


def with_parameters(notebook, values):
    """A copy of `notebook` with a cell setting `values` right after its parameters cell."""
    notebook = nbformat.from_dict(notebook)
    lines = [f"{name} = {value!r}" for name, value in values.items()]
    cell = nbformat.v4.new_code_cell("\n".join(lines), metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(parameters_index(notebook) + 1, cell)
    return notebook


class StaticTest(unittest.TestCase):
    """What the committed file must be, checked without running it."""

    @classmethod
    def setUpClass(cls):
        cls.notebook = read_notebook()

    def test_valid_nbformat_4(self):
        self.assertEqual(self.notebook.nbformat, 4)
        nbformat.validate(self.notebook)

    def test_starts_with_a_title(self):
        first = self.notebook.cells[0]
        self.assertEqual(first.cell_type, "markdown")
        self.assertTrue(first.source.startswith("# "), "the first cell should be a '# title'")

    def test_parameters_cell(self):
        cell = self.notebook.cells[parameters_index(self.notebook)]
        values = assigned_values(cell.source)
        missing = [name for name in REQUIRED_PARAMETERS if name not in values]
        self.assertEqual(missing, [], f"the parameters cell does not define {missing}")
        self.assertIs(values["SMOKE"], False, "the committed notebook must default to a real run")

    def test_outputs_cleared(self):
        for index, cell in code_cells(self.notebook):
            with self.subTest(cell=index):
                self.assertEqual(cell.outputs, [], f"cell {index} has outputs: clear them")
                self.assertIsNone(cell.execution_count, f"cell {index} has an execution count")

    def test_no_function_or_class_in_a_cell(self):
        """The notebook is a client: what would need a def or class belongs in the package."""
        for index, cell in code_cells(self.notebook):
            with self.subTest(cell=index):
                found = [f"{type(node).__name__} at line {node.lineno}"
                         for node in ast.walk(ast.parse(python_source(cell)))
                         if isinstance(node, DEFINITIONS)]
                self.assertEqual(found, [], f"cell {index} defines {found}: move it into the package")


@slow
class SmokeRunTest(unittest.TestCase):
    """The whole notebook, executed in a fresh kernel with SMOKE = True."""

    def setUp(self):
        if os.environ.get(RUNNING_FLAG):
            self.skipTest(f"{RUNNING_FLAG} is set: this is the notebook's own unit-test cell, and "
                          "executing the notebook here would start it again")
        if not shared_data_path():
            self.skipTest("SHARED_DATA_DIR is not set: the notebook would download the data "
                          "(CI points it at ../shared/data)")

    def test_runs_with_smoke(self):
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError

        with tempfile.TemporaryDirectory() as work:
            notebook = with_parameters(read_notebook(), {
                "SMOKE": True,
                "EXP_ID": 1,
                "DATA_FOLDER": os.path.join(work, "data"),
                "LOG_DIR": os.path.join(work, "logs"),
                "REPORT_DIR": os.path.join(work, "report"),
            })
            client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                    iopub_timeout=IOPUB_TIMEOUT_S, raise_on_iopub_timeout=True,
                                    startup_timeout=STARTUP_TIMEOUT_S,
                                    resources={"metadata": {"path": ROOT}})
            # The kernel and the commands it starts on one thread each, as the tests' other child
            # processes (tests/helpers.py): tiny models, and threads fighting for a busy machine's cores.
            try:
                with mock.patch.dict(os.environ, OMP_NUM_THREADS="1"):
                    client.execute()
            except CellExecutionError as error:
                self.fail(f"a cell of main.ipynb failed:\n{error}")
            outputs = [output for _, cell in code_cells(notebook) for output in cell.outputs]
            self.assertTrue(any("image/png" in output.get("data", {}) for output in outputs),
                            "the notebook displayed no figure")
            self.assertTrue(os.path.isfile(os.path.join(work, "logs", "smoke", "1", "best.pt")),
                            "the SMOKE run left no checkpoint in LOG_DIR/smoke/1")


if __name__ == "__main__":
    unittest.main()
