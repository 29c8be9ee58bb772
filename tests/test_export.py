"""examples/push_to_hub.py: the exported folder is a complete Hub repository — it runs through
`pipeline(model=DIR, trust_remote_code=True)` and through its `EndpointHandler` in a process where this
package cannot be imported, and its README's results come from the evaluation JSON."""

import base64
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from transformers import pipeline
from transformers.dynamic_module_utils import get_relative_imports

from modeling_mqspn import SHIPPED_MODULES
from modeling_mqspn.pipeline_mqspn import TASK
from test_pipeline import REPO, TWEET, export_tiny_checkpoint, load_example, tiny_model_and_processor
from test_proposers import paint_scene

BOXES = [[0, 0, 80, 60], [20, 10, 150, 110], [60, 40, 100, 100]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder, eval_path = export_tiny_checkpoint(tmp_path_factory.mktemp("export"))
    photo = paint_scene(folder.parent / "photo.jpg")
    return folder, eval_path, photo


def spans(entities):
    return [(e["start"], e["end"], e["type"], e["box"], round(e["score"], 4)) for e in entities]


def test_folder_holds_weights_config_processor_code_card_and_handler(exported):
    folder, _, _ = exported
    names = set(os.listdir(folder))
    assert {"model.safetensors", "config.json", "processor_config.json", "tokenizer.json", "README.md",
            "handler.py", "requirements.txt", "visualize.py"} <= names
    assert not [name for name in names if name.endswith((".bin", ".pt", ".pth", ".pkl"))]

    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_mqspn.MQSPNConfig",
                                  "AutoModel": "modeling_mqspn.MQSPNForGroundedNER"}
    assert config["custom_pipelines"][TASK]["impl"] == "pipeline_mqspn.GroundedNERPipeline"
    assert config["custom_pipelines"][TASK]["pt"] == ["AutoModel"]
    processor = json.loads((folder / "processor_config.json").read_text())
    assert processor["auto_map"] == {"AutoProcessor": "processing_mqspn.MQSPNProcessor"}

    # Exactly the declared remote code (not a superset), with every sibling it imports relatively.
    assert {name for name in names if name.endswith(".py")} - {"handler.py"} == set(SHIPPED_MODULES)
    for module in sorted(name for name in names if name.endswith(".py") and name != "handler.py"):
        for imported in get_relative_imports(str(folder / module)):
            assert f"{imported}.py" in names, f"{module} imports .{imported}, which was not exported"

    assert (folder / "handler.py").read_text() == (REPO / "examples" / "handler.py").read_text()
    requirements = (folder / "requirements.txt").read_text().split()
    assert any(line.startswith("transformers") for line in requirements)
    assert any(line.startswith("opencv-contrib-python-headless") for line in requirements)


def test_model_card_metadata_and_tables_come_from_the_evaluation_json(exported):
    folder, eval_path, _ = exported
    readme = (folder / "README.md").read_text()
    assert readme.startswith("---\n")
    metadata = yaml.safe_load(readme.split("\n---\n")[0][4:])
    assert metadata["license"] == "apache-2.0"
    assert metadata["language"] == ["en"]
    assert metadata["datasets"] == ["twitter-gmner"]
    assert metadata["library_name"] == "transformers"
    assert {"grounded-multimodal-ner", "custom_code"} <= set(metadata["tags"])
    assert metadata["metrics"] == ["precision", "recall", "f1"]

    results = json.loads(Path(eval_path).read_text())
    (index,) = metadata["model-index"]
    assert index["name"] == "mqspn-tiny"
    (entry,) = index["results"]
    assert entry["dataset"] == {"name": "Twitter-GMNER", "type": "twitter-gmner", "split": "test"}
    reported = {metric["name"]: metric["value"] for metric in entry["metrics"]}
    expected = {f"{task.upper()} {metric}": round(100 * results[task][metric], 2)
                for task in ("gmner", "mner", "eeg") for metric in ("precision", "recall", "f1")}
    assert reported == expected

    body = readme.split("\n---\n", 1)[1]
    assert "| GMNER | 50.00 | 25.00 | 33.33 |" in body
    assert "| MNER | 75.00 | 37.50 | 50.00 |" in body
    assert "| EEG | 62.50 | 31.25 | 41.67 |" in body
    assert "| PER | 50.00 | 50.00 | 50.00 |" in body
    assert "| entity types (p) | PER, LOC, ORG, OTHER |" in body
    assert "| entity queries (u) | 8 |" in body
    assert 'pipeline(model="someone/mqspn-tiny", trust_remote_code=True)' in body
    assert "<!--" not in body and "{repo_id}" not in body
    assert "EndpointHandler" in body and "Space" in body and "widget" in body


@pytest.fixture
def restore_pipeline_registry():
    """Loading a checkpoint's pipeline with trust_remote_code registers the task again, process-wide, with the
    class copied into the checkpoint; put the package's registration back for the tests that follow."""
    from transformers.pipelines import PIPELINE_REGISTRY

    saved = dict(PIPELINE_REGISTRY.supported_tasks[TASK])
    yield
    PIPELINE_REGISTRY.supported_tasks[TASK] = saved


def test_pipeline_with_trust_remote_code_matches_the_package(exported, restore_pipeline_registry):
    folder, _, photo = exported
    model, processor = tiny_model_and_processor()
    local = pipeline(TASK, model=model, processor=processor, device="cpu")
    remote = pipeline(model=str(folder), trust_remote_code=True, device="cpu")
    # The pipeline class comes from the folder (with this package imported, AutoModel may pick the
    # registered local model class; the subprocess test below has no package at all).
    assert type(remote).__module__.startswith("transformers_modules.")
    assert type(local).__module__ == "modeling_mqspn.pipeline_mqspn"
    example = {"text": TWEET, "image": str(photo), "boxes": BOXES}
    found = remote(example)
    assert found and spans(found) == spans(local(example))
    assert remote([example, {"text": "PSG wins"}], batch_size=2)[0] == found


def test_endpoint_handler_and_pipeline_without_the_package(exported, tmp_path):
    """A fresh interpreter where `import modeling_mqspn` fails: only the exported folder's code runs."""
    folder, _, photo = exported
    script = textwrap.dedent(
        f"""
        import base64, json, sys
        sys.modules["modeling_mqspn"] = None  # the package cannot be imported in this process
        try:
            import modeling_mqspn
        except ImportError:
            pass
        else:
            raise SystemExit("modeling_mqspn is importable")
        sys.path.insert(0, {str(folder)!r})
        from handler import EndpointHandler
        from transformers import pipeline

        handler = EndpointHandler({str(folder)!r})
        image = base64.b64encode(open({str(photo)!r}, "rb").read()).decode()
        one = handler({{"inputs": {{"text": {TWEET!r}, "image": image, "boxes": {BOXES!r}}}}})
        many = handler({{"inputs": [{{"text": {TWEET!r}, "image": image, "boxes": {BOXES!r}}}, {{"words": ["PSG", "wins"]}}],
                         "parameters": {{"threshold": 0.0, "batch_size": 2}}}})
        try:
            handler({{"inputs": {{"text": "x"}}, "parameters": {{"top_k": 3}}}})
        except ValueError as error:
            bad_parameter = str(error)
        try:
            handler({{"text": "x"}})
        except ValueError as error:
            no_inputs = str(error)
        remote = pipeline(model={str(folder)!r}, trust_remote_code=True)
        direct = remote({{"text": {TWEET!r}, "image": {str(photo)!r}, "boxes": {BOXES!r}}})
        print(json.dumps({{"one": one, "many": many, "direct": direct, "bad_parameter": bad_parameter,
                           "no_inputs": no_inputs, "pipeline_module": type(remote).__module__,
                           "package_loaded": sys.modules.get("modeling_mqspn") is not None}}))
        """
    )
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])

    assert not result["package_loaded"]
    assert result["pipeline_module"].startswith("transformers_modules.")
    model, processor = tiny_model_and_processor()
    local = pipeline(TASK, model=model, processor=processor, device="cpu")
    expected = local({"text": TWEET, "image": str(photo), "boxes": BOXES})
    assert result["one"] and spans(result["one"]) == spans(expected) == spans(result["direct"])
    assert len(result["many"]) == 2 and spans(result["many"][0]) == spans(expected)
    assert [entity["text"] for entity in result["many"][1]] and all(e["box"] is None for e in result["many"][1])
    assert "unknown parameters ['top_k']" in result["bad_parameter"]
    assert "'inputs'" in result["no_inputs"]


def test_upload_sends_the_exported_folder(tmp_path, monkeypatch):
    """Without network the real upload cannot run; a stand-in HfApi records what main() asks of it."""
    import huggingface_hub

    folder, eval_path = export_tiny_checkpoint(tmp_path)
    calls = []

    class RecordingApi:
        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path)), commit_message))
            return "commit-url"

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    code = load_example("push_to_hub").main([
        "--model", str(tmp_path / "checkpoint"), "--eval-results", str(eval_path), "--repo-id", "someone/mqspn-tiny",
        "--dataset-name", "Twitter-GMNER", "--dataset-type", "twitter-gmner", "--private",
    ])
    assert code == 0
    assert calls == [
        ("create_repo", "someone/mqspn-tiny", True, True),
        ("upload_folder", "someone/mqspn-tiny", sorted(os.listdir(folder)), "Upload MQSPN checkpoint"),
    ]


def test_export_errors_name_the_file_and_what_to_do(exported, tmp_path, capsys):
    folder, eval_path, _ = exported
    push = load_example("push_to_hub")
    checkpoint = str(folder.parent / "checkpoint")
    common = ["--repo-id", "a/b", "--dataset-name", "D", "--dataset-type", "d"]

    broken = tmp_path / "eval.json"
    broken.write_text(json.dumps({"gmner": {"precision": 0.5, "recall": 0.5, "f1": 0.5}, "mner": {}}))
    assert push.main(["--model", checkpoint, "--eval-results", str(broken), "--dry-run", str(tmp_path / "x"), *common]) == 2
    assert f"{broken}: 'mner.precision' must be a fraction" in capsys.readouterr().err

    broken.write_text(json.dumps({task: {"precision": 50, "recall": 0.5, "f1": 0.5} for task in ("gmner", "mner", "eeg")}))
    assert push.main(["--model", checkpoint, "--eval-results", str(broken), "--dry-run", str(tmp_path / "x"), *common]) == 2
    assert "'gmner.precision' must be a fraction in [0, 1], got 50" in capsys.readouterr().err

    assert push.main(["--model", checkpoint, "--eval-results", str(eval_path), "--dry-run", str(folder), *common]) == 2
    assert "must be new or empty" in capsys.readouterr().err

    bare = tmp_path / "bare"
    model, _ = tiny_model_and_processor()
    model.save_pretrained(bare)
    assert push.main(["--model", str(bare), "--eval-results", str(eval_path), "--dry-run", str(tmp_path / "y"), *common]) == 2
    assert "no processor_config.json" in capsys.readouterr().err
