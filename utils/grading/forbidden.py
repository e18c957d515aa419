"""The torch functions the course's grader disables, found two ways.

- At run time (`disable`, in the worker before the student's code is imported) each one is
  replaced by a stub raising `ForbiddenFunctionError`; a graded function that reaches one scores 0.
- In the source (`static_uses`): an AST walk flags `nn.LayerNorm`, `torch.nn.LayerNorm`,
  `F.layer_norm`, `torch.layer_norm`, `nn.MultiheadAttention`, `F.multi_head_attention_forward`
  and names imported from torch under any alias. The student's own `LayerNorm` class (its
  definition, `LayerNorm(...)` by name) is not flagged. A use inside a graded method counts against
  it; a use elsewhere in a class (`__init__`, a helper) against every graded method of that class;
  a use in a module-level function against the graded methods that name that function.
"""
import ast

# (module path, attribute): what the course disables, as reached from the torch modules.
DISABLED = (
    ("torch", "layer_norm"),
    ("torch", "native_layer_norm"),
    ("torch.nn.functional", "layer_norm"),
    ("torch.nn.functional", "multi_head_attention_forward"),
    ("torch.nn", "LayerNorm"),
    ("torch.nn.modules", "LayerNorm"),
    ("torch.nn.modules.normalization", "LayerNorm"),
    ("torch.nn", "MultiheadAttention"),
    ("torch.nn.modules", "MultiheadAttention"),
    ("torch.nn.modules.activation", "MultiheadAttention"),
)
# Attribute names that are always the forbidden function (`anything.layer_norm`).
ALWAYS_FORBIDDEN = {"layer_norm", "native_layer_norm", "MultiheadAttention", "multi_head_attention_forward"}
# `X.LayerNorm` is torch's unless X is the student's module: the file cannot name itself so.
FORBIDDEN_ATTRIBUTES = ALWAYS_FORBIDDEN | {"LayerNorm"}


class ForbiddenFunctionError(RuntimeError):
    """A disabled torch function was called: the graded function that called it scores 0."""


def disabled_message(name):
    return f"{name} is disabled in this assignment: write it out with tensor operations"


def disable():
    """Replace every disabled function by a stub that raises (in the worker process only)."""
    import importlib

    import torch.nn as nn

    for module_name, attribute in DISABLED:
        module = importlib.import_module(module_name)
        if not hasattr(module, attribute):
            continue
        qualified = f"{module_name}.{attribute}"
        if isinstance(getattr(module, attribute), type):
            setattr(module, attribute, _disabled_class(qualified, nn.Module))
        else:
            setattr(module, attribute, _disabled_function(qualified))


def _disabled_function(qualified):
    def disabled(*args, **kwargs):
        raise ForbiddenFunctionError(disabled_message(qualified))
    disabled.__name__ = qualified.rsplit(".", 1)[1]
    return disabled


def _disabled_class(qualified, base):
    def __init__(self, *args, **kwargs):
        raise ForbiddenFunctionError(disabled_message(qualified))
    return type(qualified.rsplit(".", 1)[1], (base,), {"__init__": __init__})


def _torch_module(name):
    return name == "torch" or name.startswith("torch.")


def _forbidden_nodes(tree):
    """(node, description) for each forbidden reference in `tree`."""
    aliases = {}  # a local name bound to a forbidden torch name -> what it is
    own_classes = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and _torch_module(node.module):
            for alias in node.names:
                if alias.name in FORBIDDEN_ATTRIBUTES and (alias.asname or alias.name) not in own_classes:
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    # A class named in isinstance / issubclass is compared with, never called: not a use.
    compared = {id(inner) for node in ast.walk(tree)
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("isinstance", "issubclass") and len(node.args) == 2
                for inner in ast.walk(node.args[1])}
    found = []
    for node in ast.walk(tree):
        if id(node) in compared:
            continue
        if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_ATTRIBUTES:
            if _chain_root(node) != "self":  # the student's own attribute or method
                found.append((node, ast.unparse(node)))
        elif isinstance(node, ast.Name) and node.id in aliases:
            found.append((node, aliases[node.id]))
    return found


def _chain_root(node):
    """The name an attribute chain starts from (`self` for `self.norm.layer_norm`), else None."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def static_uses(source, graded):
    """{`Class.method`: [description, ...]} of forbidden uses in `source`, for the `graded` names.

    Raises SyntaxError when `source` does not parse.
    """
    tree = ast.parse(source)
    owner = {}  # id(node) -> (class name or None, function name or None)
    calls = {}  # graded name -> names it refers to
    for top in tree.body:
        if isinstance(top, ast.ClassDef):
            for item in top.body:
                method = item.name if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
                for node in ast.walk(item):
                    owner[id(node)] = (top.name, method)
                if f"{top.name}.{method}" in graded:
                    calls[f"{top.name}.{method}"] = {n.id for n in ast.walk(item) if isinstance(n, ast.Name)}
        elif isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(top):
                owner[id(node)] = (None, top.name)
    uses = {}
    for node, description in _forbidden_nodes(tree):
        class_name, function = owner.get(id(node), (None, None))
        if class_name is not None and f"{class_name}.{function}" in graded:
            targets = [f"{class_name}.{function}"]
        elif class_name is not None:
            targets = [name for name in graded if name.split(".")[0] == class_name]
        elif function is not None:
            targets = [name for name, names in calls.items() if function in names]
        else:
            targets = []  # a module-level line: the run-time stub catches its use
        for target in targets:
            line = f"uses {description} (line {node.lineno})"
            if line not in uses.setdefault(target, []):
                uses[target].append(line)
    return uses
