"""The package keeps to docs/architecture.md: imports point down the layers, no module imports
another's private names, and every layer kind says in its class what the rest of the package asks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lora
from lora.layers import LAYER_KINDS, LoRALayer

ROOT = Path(lora.__file__).resolve().parent

# Lower layers first (docs/architecture.md). A module imports only modules of its own layer or below.
LAYERS = [
    ("lora.checks", "lora._io", "lora._regex_guard", "lora._heap", "lora._matmul", "lora._dropout"),
    ("lora.functional", "lora.quant"),
    ("lora.layers",),
    ("lora.config", "lora.data", "lora.models"),
    ("lora.model_state", "lora.targets"),
    ("lora.surgery",),
    ("lora.multi",),
    ("lora.adapters",),
    ("lora",),  # the public API: lora/__init__.py
    ("lora.finetune",),
    ("lora.demo",),
]
# Up-arrows on purpose: the command lines' defaults (run the demo, chat with the demo's model).
ALLOWED_UP = {("lora.finetune.__main__", "lora.demo"), ("lora.finetune.generate", "lora.demo")}
# Phi-3 and the checkpoint format know nothing of LoRA.
MODELS_MAY_NOT_IMPORT = (
    "lora.layers",
    "lora.config",
    "lora.targets",
    "lora.surgery",
    "lora.multi",
    "lora.adapters",
    "lora.model_state",
)


def _module_name(path: Path) -> str:
    parts = ["lora", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def _imports(path: Path):
    """``(imported module, names)`` for every ``lora`` import in the file (function-level too)."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "lora":
                continue
            names = [a.name for a in node.names]
            submodules = [f"{module}.{n}" for n in names if _is_module(f"{module}.{n}")]
            yield from ((s, []) for s in submodules)
            if len(submodules) < len(names):
                yield module, [n for n in names if not _is_module(f"{module}.{n}")]
        elif isinstance(node, ast.Import):
            yield from ((a.name, []) for a in node.names if a.name.split(".")[0] == "lora")


def _layer(module: str) -> int:
    best = None
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and (best is None or len(n) > best[1]):
                best = (i, len(n))
    assert best is not None, f"{module} is in no layer of LAYERS"
    return best[0]


FILES = sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_and_name_nothing_private(path):
    me = _module_name(path)
    for module, names in _imports(path):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{me} imports private names {private} from {module}"
        if (me, module.rsplit(".", 1)[0]) in ALLOWED_UP or (me, module) in ALLOWED_UP:
            continue
        assert _layer(module) <= _layer(me), (
            f"{me} (layer {_layer(me)}) imports {module} (layer {_layer(module)})"
        )
        if me.startswith("lora.models"):
            assert not module.startswith(MODELS_MAY_NOT_IMPORT), f"{me} imports {module}"


@pytest.mark.parametrize("kind", LAYER_KINDS, ids=lambda k: k.__name__)
def test_each_layer_kind_says_what_the_package_asks(kind):
    # What surgery, adapter files and several adapters ask of a kind is answered by its class.
    assert kind.accepts is not LoRALayer.accepts
    assert kind.peft_shapes is not LoRALayer.peft_shapes
    assert kind._plain_like is not LoRALayer._plain_like
    assert isinstance(kind.kind, str) and len(kind.peft_keys) == 2


def test_no_isinstance_chain_on_layer_kinds_outside_layers():
    # Adding a layer kind means one new class: surgery, adapters and multi ask the layer instead.
    kinds = {k.__name__ for k in LAYER_KINDS} | {"MergedLinear", "ConvLoRA"}
    for name in ("surgery.py", "adapters.py", "multi.py", "targets.py"):
        tree = ast.parse((ROOT / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in (
                "isinstance",
                "issubclass",
            ):
                named = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                assert not named & kinds, (
                    f"{name}:{node.lineno} checks the layer kind {named & kinds}"
                )
