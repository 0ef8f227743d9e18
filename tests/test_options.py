"""The option table (minercore.contract.options): both command lines, ``minercore serve`` and the miner, are built
from it, with the same defaults, choices and bounds; the choices agree with what they name; and the miner's ``--help``
loads no torch."""

import argparse
import ast
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minercore import __main__ as cli
from minercore.contract.config import DTYPE_NAMES, PRESET_NAMES, EngineOptions, ModelOptions
from minercore.contract.options import OPTIONS, core_options
from minercore.miner import config as miner_config

ROOT = Path(__file__).resolve().parents[1]


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    cli._add_serve(parser.add_subparsers(dest="command"))
    return parser


def serve_options(*args: str) -> tuple[ModelOptions, EngineOptions]:
    parsed = serve_parser().parse_args(["serve", *args])
    return core_options(lambda option: getattr(parsed, option.name))


def miner_options(*args: str) -> tuple[ModelOptions, EngineOptions]:
    return miner_config.core_options(miner_config.build_config(["--offline", *args]))


def test_every_core_field_is_in_the_table_once():
    named = [(option.section, option.name) for option in OPTIONS]
    assert len(named) == len(set(named))
    expected = {(section, field.name) for section in (ModelOptions, EngineOptions)
                for field in dataclasses.fields(section)}
    assert set(named) == expected


def test_both_command_lines_offer_every_option_with_the_core_defaults():
    assert serve_options() == miner_options() == (ModelOptions(), EngineOptions())
    serve_flags = {s for action in serve_parser()._subparsers._group_actions[0].choices["serve"]._actions
                   for s in action.option_strings}
    miner_flags = {s for action in miner_config.build_parser()._actions for s in action.option_strings}
    for option in OPTIONS:
        assert option.serve_flag in serve_flags and option.miner_flag in miner_flags, option.name


def test_the_same_values_reach_the_same_dataclasses():
    values = {"backend": "hf", "preset": "gpt2", "mode": "generate", "weights": "/w", "path": "/p",
              "tokenizer": "tok", "compile": "off", "graphs": "manual", "attention": "flex", "max_context": "512",
              "seed": "7", "upstream_url": "http://u/v1", "quant": "none", "quant_group": "64",
              "activations": "float", "upstream_model": "m", "upstream_api_key_env": "KEY", "device": "cpu",
              "dtype": "bfloat16",
              "threads": "3", "max_batch": "8", "max_queue": "0", "max_new_tokens": "99", "max_prompt_chars": "1000",
              "overlap": "off", "flush_tokens": "3", "flush_ms": "12.5", "prefill_tokens": "256",
              "speculative": "off", "speculative_tokens": "3", "kv_cache": "static", "kv_block_size": "32",
              "kv_cache_gb": "1.5", "prefix_cache": "off", "kv_memory_fraction": "0.5"}
    assert set(values) == {option.name for option in OPTIONS}
    by_name = {option.name: option for option in OPTIONS}
    serve = serve_options(*[a for name, v in values.items() for a in (by_name[name].serve_flag, v)])
    miner = miner_options(*[a for name, v in values.items() for a in (by_name[name].miner_flag, v)])
    assert serve == miner
    model, engine = serve
    assert (model.backend, model.max_context, model.dtype, engine.max_queue, engine.flush_ms) == (
        "hf", 512, "bfloat16", 0, 12.5)
    assert (model.graphs, model.attention, engine.overlap) == ("manual", "flex", False)
    assert (engine.speculative, engine.speculative_tokens) == ("off", 3)
    assert engine.max_prompt_chars == 1000  # serve has it now too
    assert engine.prefill_tokens == 256
    assert (model.quant, model.quant_group) == ("none", 64)
    assert model.threads == 3


@pytest.mark.parametrize("name, value", [
    ("max_batch", "-1"), ("max_queue", "-1"), ("max_new_tokens", "0"), ("max_prompt_chars", "0"),
    ("max_context", "0"), ("flush_tokens", "0"), ("prefill_tokens", "0"), ("flush_ms", "-1"), ("flush_ms", "nan"),
    ("seed", "x"), ("threads", "-1"), ("kv_memory_fraction", "0"), ("kv_memory_fraction", "1.1"),
    ("backend", "vllm"), ("mode", "chat"), ("compile", "maybe"), ("preset", "huge"), ("dtype", "int8"),
    ("graphs", "cuda"), ("attention", "paged"), ("overlap", "yes"),
])
def test_bounds_and_choices_are_enforced_by_both(name, value, capsys):
    option = next(option for option in OPTIONS if option.name == name)
    with pytest.raises(SystemExit) as serve_exit:
        serve_parser().parse_args(["serve", option.serve_flag, value])
    with pytest.raises(SystemExit) as miner_exit:
        miner_config.build_config(["--offline", option.miner_flag, value])
    assert serve_exit.value.code == miner_exit.value.code == 2
    assert "error" in capsys.readouterr().err


def test_help_names_the_other_options_in_each_spelling():
    backend = next(option for option in OPTIONS if option.name == "backend")
    serve_help = " ".join(serve_parser()._subparsers._group_actions[0].choices["serve"].format_help().split())
    miner_help = " ".join(miner_config.build_parser().format_help().split())
    assert "--upstream-url" in serve_help and "--model.upstream_url" not in serve_help
    assert "--model.upstream_url)" in miner_help
    assert "{" not in backend.help.format_map({o.name: "" for o in OPTIONS})


def test_the_choices_name_what_exists():
    from minercore.models.presets import GPT2_PRESETS as PRESETS
    from minercore.models.presets import LLAMA_PRESETS
    from minercore.runtime.device import DTYPES

    assert (*PRESETS, *LLAMA_PRESETS) == PRESET_NAMES
    assert tuple(DTYPES) == DTYPE_NAMES


def test_model_options_check_the_choices_in_one_place():
    for field, value in (("backend", "vllm"), ("mode", "chat"), ("compile", "maybe"), ("preset", "gpt5")):
        with pytest.raises(ValueError, match=field):
            ModelOptions(**{field: value})


def test_miner_help_loads_no_torch():
    code = ("import runpy, sys\n"
            "sys.argv = ['neurons/miner.py', '--help']\n"
            "try:\n    runpy.run_path('neurons/miner.py', run_name='__main__')\n"
            "except SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
            "print('torch loaded:', 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert "--engine.max_batch" in out.stdout
    assert out.stdout.strip().endswith("torch loaded: False")


def test_no_import_circle_in_minercore():
    """Every import between minercore's modules, lazy ones included, points one way."""
    package = ROOT / "minercore"
    modules = {".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
               for path in package.rglob("*.py")}
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        parts = name.split(".")
        base = parts if path.name == "__init__.py" else parts[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                source = ".".join(base[:len(base) - node.level + 1]) if node.level else ""
                target = ".".join(filter(None, (source, node.module))) if node.level else node.module or ""
                candidates = [target, *(f"{target}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            edges[name].update(c for c in candidates if c in modules and c != name and c != "minercore")

    acyclic: set[str] = set()  # modules whose imports, transitively, were all followed without a circle

    def visit(name: str, path: list[str]) -> None:
        for target in edges[name] - acyclic:
            assert target not in path, f"import circle: {' -> '.join([*path[path.index(target):], target])}"
            visit(target, [*path, target])
        acyclic.add(name)

    for name in modules:
        visit(name, [name])
    assert edges["minercore.runtime.hf"] >= {"minercore.runtime.sampling"} and "minercore.runtime.native" not in edges[
        "minercore.runtime.hf"]


# The layers, lowest first: a module may import its own layer and those below it, never one above.
LAYERS = ("contract", "text", "kv", "models", "runtime", "engine", "backends", "serve", "miner")


def _imports_between_packages() -> list[tuple[str, str]]:
    """(importing module, imported module) for every import inside minercore, lazy and type-only ones too."""
    package = ROOT / "minercore"
    found = []
    for path in package.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        parts = name.split(".")
        base = parts if path.name == "__init__.py" else parts[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                source = ".".join(base[:len(base) - node.level + 1]) if node.level else ""
                target = ".".join(filter(None, (source, node.module))) if node.level else node.module or ""
                targets = [target, *(f"{target}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            found += [(name, t) for t in targets if t.startswith("minercore.")]
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_lives_in_a_layer():
    package = ROOT / "minercore"
    stray = [p.name for p in package.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert not stray, f"modules outside the layer packages: {stray}"
    assert {p.name for p in package.iterdir() if p.is_dir() and not p.name.startswith("__")} == set(LAYERS)


def test_imports_point_down_the_layers_only():
    upward = [(a, b) for a, b in _imports_between_packages()
              if _layer(a) is not None and _layer(b) is not None and _layer(b) > _layer(a)]
    assert not upward, "imports from a lower layer into a higher one: " + ", ".join(f"{a} -> {b}" for a, b in upward)


def test_the_layer_walk_sees_lazy_imports():
    """The walk reads imports inside functions too (the engine loads the stream loop at module level, the
    tokenizer lazily): an upward import hidden in a function would not escape the check above."""
    assert _layer("minercore.contract.observe") < _layer("minercore.engine.loop")
    found = _imports_between_packages()
    assert ("minercore.engine.loop", "minercore.text.streamloop") in found
    assert ("minercore.engine.loop", "minercore.text.tokenizer") in found
