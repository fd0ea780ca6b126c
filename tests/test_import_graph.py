"""The package's import graph has no cycles (docs/architecture.md), counted from the sources by
benchmarks/import_graph.py; and the counter itself finds a cycle that is there."""

import importlib.util
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def counter():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "benchmarks" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_package_has_no_import_cycle():
    figures = counter().measure()
    assert figures["cycles"] == [], figures["cycles"]
    assert figures["modules"] > 50


def test_the_counter_sees_a_cycle_made_inside_a_function(tmp_path, monkeypatch):
    graph = counter()
    package = tmp_path / "lora_diffusion"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "b.py").write_text(textwrap.dedent("""
        def later():
            from lora_diffusion import a
    """))
    (package / "c.py").write_text("import lora_diffusion.a\n")
    monkeypatch.setattr(graph, "ROOT", tmp_path)
    figures = graph.measure()
    assert figures["cycles"] == [["lora_diffusion.a", "lora_diffusion.sub.b"]]
    assert figures["imports_inside_functions"] == ["lora_diffusion.sub.b -> lora_diffusion.a"]
