"""What ships and what does not (docs/ARCHITECTURE.md, "What ships and what does not"): the shipped modules are
exactly `SHIPPED_MODULES`, import only each other and never the tools; `import modeling_mqspn` pulls in no
training dependency and registers no pipeline; a checkpoint written by `tools.export.save_checkpoint` holds
exactly the shipped code and runs through `pipeline(model=folder)`; train.py reads the label space and k of a
checkpoint it continues; the docs point at nothing outside the repository."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers.dynamic_module_utils import get_relative_imports

import modeling_mqspn
from modeling_mqspn import SHIPPED_MODULES
from test_pipeline import TWEET, load_example, tiny_model_and_processor

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "modeling_mqspn"


def imported_names(path):
    """Every module name an import statement of `path` names, with its level of relativity."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or "", [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((0, alias.name, []) for alias in node.names)
    return found


def test_the_flat_modules_are_exactly_the_shipped_set_and_import_only_each_other():
    flat = sorted(path.name for path in PACKAGE.glob("*.py") if path.name != "__init__.py")
    assert flat == sorted(SHIPPED_MODULES), "a flat module of modeling_mqspn/ ships: list it in SHIPPED_MODULES"
    for name in SHIPPED_MODULES:
        path = PACKAGE / name
        for imported in get_relative_imports(str(path)):
            assert f"{imported}.py" in SHIPPED_MODULES, f"{name} imports .{imported}, which does not ship"
        for level, module, names in imported_names(path):
            assert not module.startswith("modeling_mqspn"), f"{name}: absolute import of {module} breaks remote code"
            assert level <= 1, f"{name}: `from {'.' * level}{module}` reaches outside the shipped folder"
            assert "tools" not in module.split(".") and "tools" not in names, f"{name} imports the tools"


def test_tools_modules_are_not_flat_modules():
    tools = sorted(path.name for path in (PACKAGE / "tools").glob("*.py"))
    assert {"data.py", "metrics.py", "training.py", "feature_cache.py", "demo_data.py", "file_utils.py",
            "export.py"} <= set(tools)
    assert not set(tools) & set(SHIPPED_MODULES)


def test_importing_the_package_imports_no_training_dependency_and_registers_no_pipeline():
    code = (
        "import sys, modeling_mqspn\n"
        "from transformers.pipelines import PIPELINE_REGISTRY\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('datasets', 'gradio') "
        "or m.startswith('modeling_mqspn.tools') or m == 'modeling_mqspn.pipeline_mqspn')\n"
        "print(loaded, 'grounded-ner' in PIPELINE_REGISTRY.get_supported_tasks())\n"
        "modeling_mqspn.GroundedNERPipeline\n"
        "print(callable(modeling_mqspn.load_twitter_gmner), 'grounded-ner' in PIPELINE_REGISTRY.get_supported_tasks())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.strip().splitlines()
    assert first == "[] False"
    # The public names still work, loaded on first use (the pipeline module registers its task then).
    assert second == "True True"


def test_public_names_listed_in_all_resolve():
    for name in modeling_mqspn.__all__:
        assert getattr(modeling_mqspn, name) is not None, name
    with pytest.raises(AttributeError, match="has no attribute 'load_twiter_gmner'"):
        modeling_mqspn.load_twiter_gmner  # noqa: B018


def test_a_saved_checkpoint_holds_exactly_the_shipped_code_and_names_its_pipeline(tmp_path):
    from modeling_mqspn.tools.export import save_checkpoint, shipped_code_in

    model, processor = tiny_model_and_processor()
    save_checkpoint(model, processor, tmp_path / "best")
    assert shipped_code_in(tmp_path / "best") == sorted(SHIPPED_MODULES)
    config = json.loads((tmp_path / "best" / "config.json").read_text())
    assert config["custom_pipelines"]["grounded-ner"]["impl"] == "pipeline_mqspn.GroundedNERPipeline"
    # No task given: the config names it. In a subprocess, so that the remote pipeline class registered by
    # loading it does not replace the package's own in this process's registry.
    code = ("from transformers import pipeline; "
            f"ner = pipeline(model={str(tmp_path / 'best')!r}, trust_remote_code=True); "
            f"print(type(ner).__module__, len(ner({{'text': {TWEET!r}}})) > 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    module, found = done.stdout.split()[-2:]
    assert module.startswith("transformers_modules") and found == "True"
    # A folder holding other code (an older export, say) is refused rather than mixed.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "data_mqspn.py").write_text("")
    with pytest.raises(RuntimeError, match=r"not part of the checkpoint's code: \['data_mqspn.py'\]"):
        save_checkpoint(model, processor, tmp_path / "old")


def test_train_reads_the_label_space_and_k_of_the_checkpoint_it_continues(tmp_path, capsys):
    """A checkpoint saved with k = 8 is read with k = 8 (not the recipe's or the default 18)."""
    from modeling_mqspn.tools.export import save_checkpoint

    model, processor = tiny_model_and_processor()
    model.config.max_regions = processor.max_regions = 8
    model.config.entity_types = ["PER", "LOC", "ORG", "OTHER"]
    save_checkpoint(model, processor, tmp_path / "k8")
    boxes = [[i, i, i + 10, i + 10] for i in range(12)]
    for split in ("train", "dev"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps(
            {"id": split, "words": ["Messi", "lands"], "image_size": [100, 100], "proposals": boxes,
             "entities": [{"start": 0, "end": 0, "type": "PER"}]}) + "\n")
    train = load_example("train")
    args = train.parse_args(["--dataset_format", "jsonl", "--train_file", str(tmp_path / "train.jsonl"),
                             "--dev_file", str(tmp_path / "dev.jsonl"), "--model_name_or_path", str(tmp_path / "k8"),
                             "--model_config", '{"max_regions": 18}'])
    splits = train.load_data(args, dict(args.model_config))
    assert [len(splits[split][0]["proposals"]) for split in ("train", "dev")] == [8, 8]
    assert "model_config ['max_regions'] is ignored" in capsys.readouterr().out


# The development documents beside the repository, spelled in pieces so that this file does not name them itself.
OUTSIDE = ("../" + "shared", "shared" + "/docs", "paper-" + "mqspn", "HF-" + "NOTES") + tuple(
    name + ".md" for name in ("MODEL", "REFERENCE", "STYLE"))


def test_docs_and_code_point_at_no_file_outside_the_repository():
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in listed:
        if name.startswith(("tests/", "bench/results/")) or not name.endswith((".py", ".md", ".json", ".sh", ".txt")):
            continue  # the tests read the real releases beside the repository when they exist, and skip otherwise
        text = (REPO / name).read_text(encoding="utf-8", errors="replace")
        offenders += [f"{name}: {marker}" for marker in OUTSIDE if marker in text.replace("MODEL_CARD.md", "")]
    assert not offenders


def test_every_module_declares_its_public_names_in_all_at_the_top():
    for path in sorted(PACKAGE.glob("*.py")) + sorted((PACKAGE / "tools").glob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defined, declared, first_definition, all_line = set(), None, None, None
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
                [t.id for t in targets if isinstance(t, ast.Name)]
            if "__all__" in names:
                declared, all_line = set(ast.literal_eval(node.value)), node.lineno
                continue
            public = {name for name in names if not name.startswith("_") and name != "logger"}
            if public and first_definition is None:
                first_definition = node.lineno
            defined |= public
        assert declared == defined, f"{path.name}: __all__ should list exactly {sorted(defined)}"
        assert first_definition is None or all_line < first_definition, f"{path.name}: __all__ belongs at the top"
