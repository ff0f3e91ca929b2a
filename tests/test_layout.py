"""The package's shape, as docs/METHOD.md and the README describe it: a reference core that reads
in an afternoon, loading beside it, and speed, commands and evaluation as layers on top that the
core never imports. These checks read the source; they fail on the first file that breaks a rule."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "minibldm"
CORE = ["config", "attention", "unet", "control", "autoencoder", "clip", "tokenizer", "ddim",
        "sampler", "adapt", "masks", "foreground", "pipeline"]
LOADING = ["weights", "io", "images", "convert", "cli"]  # what reads files, weights, command lines
OUTER = ["fast", "commands", "eval"]


def modules() -> dict[str, Path]:
    """Dotted name below minibldm (e.g. "commands.sample", "convert") -> file."""
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = f.relative_to(PKG).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"] = f
    return out


def imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module below minibldm, imported names) for every import of the package in a file,
    with relative imports resolved; lazy imports inside functions count too."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("minibldm"):
                target = node.module[len("minibldm."):] if node.module != "minibldm" else ""
            else:
                continue
            names = [a.name for a in node.names]
            if not node.module or (node.level and target in modules() and names and
                                   f"{target}.{names[0]}" in modules()):
                found += [(f"{target}.{n}".strip("."), []) for n in names]  # from . import x
            else:
                found.append((target, names))
        elif isinstance(node, ast.Import):
            found += [(a.name[len("minibldm."):], []) for a in node.names
                      if a.name.startswith("minibldm.")]
    return found


def layer(name: str) -> str:
    top = name.split(".")[0]
    if top in CORE:
        return "core"
    if top in LOADING:
        return "loading"
    if top in OUTER:
        return top
    return "entry"  # minibldm/__init__.py and the `python -m` files


def test_core_and_loading_import_no_outer_layer():
    for name, path in modules().items():
        if layer(name) in ("core", "loading"):
            for target, _ in imports(name, path):
                assert layer(target) in ("core", "loading"), f"{path}: imports {target}"


def test_commands_do_not_import_evaluation_and_fast_does_not_import_commands():
    for name, path in modules().items():
        for target, _ in imports(name, path):
            if layer(name) == "commands":
                assert layer(target) != "eval", f"{path}: imports {target}"
            if layer(name) == "fast":
                assert layer(target) not in ("commands", "eval"), f"{path}: imports {target}"


def test_no_import_cycles():
    mods = modules()
    graph = {n: {t for t, _ in imports(n, p) if t in mods and t != n} for n, p in mods.items()}
    state: dict[str, int] = {}

    def visit(n, trail):
        state[n] = 1
        for m in graph[n]:
            assert state.get(m) != 1, "import cycle: " + " -> ".join(trail + [n, m])
            if m not in state:
                visit(m, trail + [n])
        state[n] = 2
    for n in graph:
        if n not in state:
            visit(n, [])


def test_no_private_names_across_modules():
    for name, path in modules().items():
        for target, names in imports(name, path):
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            assert not private, f"{path}: imports {private} from {target}"


def test_sizes():
    """The core reads in an afternoon; no file over 400 lines, no function over 60."""
    mods = modules()
    core = sum(len(p.read_text().splitlines()) for n, p in mods.items() if layer(n) == "core")
    assert core <= 2000, core
    for path in mods.values():
        lines = path.read_text().splitlines()
        assert len(lines) <= 400, f"{path}: {len(lines)} lines"
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                assert n <= 60, f"{path}:{node.lineno} {node.name}: {n} lines"


BRANCHES = ("device", "is_grad_enabled", "is_exporting", "is_compiling", "shape", "numel",
            "is_contiguous")


@pytest.mark.parametrize("name", [n for n in CORE])
def test_core_forward_has_no_data_dependent_branch(name):
    """No `forward` in the core branches on device, grad mode, export state or tensor size, so
    torch.export and torch.compile see one graph and a porter reads one path."""
    path = modules()[name]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == "forward":
            for test in [n.test for n in ast.walk(node) if isinstance(n, (ast.If, ast.IfExp))]:
                used = {a.attr for a in ast.walk(test) if isinstance(a, ast.Attribute)}
                assert not used & set(BRANCHES), f"{path}:{test.lineno}: branches on {used}"


def test_the_import_reader_sees_relative_and_lazy_imports(tmp_path):
    """Else the layer checks above could pass without reading anything."""
    f = tmp_path / "x.py"
    f.write_text("from ..fast import optimize\ndef g():\n    from ..eval import metrics\n"
                 "    from minibldm.commands.sample import _private\n")
    assert [t for t, _ in imports("commands.x", f)] == ["fast", "eval.metrics", "commands.sample"]
    assert layer("fast") == "fast" and layer("eval.metrics") == "eval"


def test_method_doc_names_functions_that_exist():
    """docs/METHOD.md maps each equation and algorithm step to a `file.py:function`; every one
    must name a definition that exists (else the reader's path from the paper breaks)."""
    import re
    text = (PKG.parent / "docs" / "METHOD.md").read_text()
    refs = set(re.findall(r"`((?:minibldm/)?[\w/]+\.py):([\w.]+)`", text))
    assert len(refs) >= 30
    for file, name in refs:
        path = PKG.parent / file if file.startswith("minibldm/") else PKG / file
        assert path.is_file(), file
        scope = ast.parse(path.read_text()).body
        for part in name.split("."):
            found = [n for n in scope if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                     and n.name == part]
            if not found:  # an attribute set in __init__, e.g. ControlNet.input_hint_block
                assert f"self.{part}" in path.read_text(), f"{file}:{name}"
                break
            scope = found[0].body
    assert "adapt.py:adaptation_loss" in text  # Algorithm 2's loss, one lookup away
