"""The requirement files: the runtime's leave a notebook host's Jupyter stack alone."""
import os
import re
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JUPYTER = ("ipykernel", "ipywidgets", "nbclient", "nbformat", "notebook", "jupyter", "jupyterlab",
           "jupyter-client", "jupyter_client", "ipython", "traitlets", "tornado")


def requirement_names(name):
    with open(os.path.join(ROOT, name)) as file:
        lines = [line.split("#")[0].strip() for line in file]
    return [re.split(r"[<>=!~;\[ ]", line)[0].lower() for line in lines if line and not line.startswith("-")]


class RequirementsTest(unittest.TestCase):
    def test_runtime_names_no_jupyter_package(self):
        names = requirement_names("requirements.txt")
        self.assertIn("torch", names)
        self.assertEqual([name for name in names if name in JUPYTER], [])

    def test_dev_holds_the_runtime_and_the_test_tools(self):
        with open(os.path.join(ROOT, "requirements-dev.txt")) as file:
            self.assertIn("-r requirements.txt", file.read())
        self.assertTrue({"nbformat", "nbclient", "ipykernel"} <= set(requirement_names("requirements-dev.txt")))

    def test_ci_installs_both(self):
        with open(os.path.join(ROOT, ".ci", "run")) as file:
            self.assertIn("-r requirements-dev.txt", file.read())

    def test_torch_floor_is_a_release_with_the_apis_used(self):
        with open(os.path.join(ROOT, "requirements.txt")) as file:
            (torch_line,) = [line for line in file if line.startswith("torch")]
        floor = tuple(int(part) for part in re.search(r">=(\d+)\.(\d+)", torch_line).groups())
        self.assertGreaterEqual(floor, (2, 6))  # torch.cuda.device_memory_used (NVML memory) came in 2.6


if __name__ == "__main__":
    unittest.main()
