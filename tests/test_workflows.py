"""Real workflows that must not break (issue 13): a bad input fails only itself, a typo is refused with
the fix, one data path from your own JSONL to a published model, long runs that resume cleanly.
Each test failed on the commit before its fix."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conftest import load_script  # noqa: E402
from test_export import restore_pipeline_registry  # noqa: E402,F401  (fixture)
from test_feature_cache import model, processor  # noqa: E402,F401  (fixtures)


# --------------------------------------------------------------------------------------------------
# Crashes and lost work


def test_a_tweet_with_proposals_but_no_image_file_trains_as_no_image(tmp_path, model, processor):  # noqa: F811
    from modeling_mqspn.tools.data import load_twitter_gmner
    from modeling_mqspn.tools.demo_data import DemoDataConfig, generate_demo_release
    from modeling_mqspn.tools.feature_cache import RegionFeatureCache
    from modeling_mqspn.tools.training import GroundedNERCollator

    release = tmp_path / "release"
    generate_demo_release(release, seed=0, config=DemoDataConfig(num_train=4, num_dev=2, num_test=2))
    images = sorted((release / "images").iterdir())
    images[0].unlink()  # its VinVL file stays: proposals without an image
    dataset, report = load_twitter_gmner(str(release / "train.txt"), xml_dir=str(release / "xml"),
                                         images_dir=str(release / "images"), vinvl_dir=str(release / "vinvl"), top_k=4)
    orphan = [row for row in dataset if row["image"] is None and row["proposals"]]
    assert orphan, "the fixture must hold a tweet with proposals and no image"
    cache = RegionFeatureCache(tmp_path / "cache", model, processor)
    stats = cache.precompute(dataset)  # IndexError before the fix
    assert stats["missing_images"] == len(orphan)
    collator = GroundedNERCollator(processor, lambda row: cache.get(row["image"], row["proposals"][:4]).numpy(),
                                   model.config.vision_config.hidden_size)
    batch = collator(orphan)
    assert not batch["region_mask"].any()  # "no image": only the ungroundable token


@pytest.fixture
def image_server(tmp_path):
    """A local HTTP server (127.0.0.1 only) serving tmp_path/www; yields its base URL."""
    import functools
    import http.server
    import threading

    from PIL import Image

    www = tmp_path / "www"
    www.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(www / "photo.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def closed_port_url():
    from conftest import free_port

    return f"http://127.0.0.1:{free_port()}/photo.png"


def test_image_urls_are_fetched_with_the_standard_library_a_timeout_and_a_size_cap(image_server, monkeypatch):
    from modeling_mqspn import image_utils

    monkeypatch.setitem(sys.modules, "httpx", None)  # a clean environment: importing httpx fails
    image = image_utils.load_rgb_image(f"{image_server}/photo.png")
    assert image.size == (60, 40) and image.mode == "RGB"
    with pytest.raises(ValueError, match="HTTP 404"):
        image_utils.load_rgb_image(f"{image_server}/missing.png")
    with pytest.raises(ValueError, match="unreachable"):
        image_utils.load_rgb_image(closed_port_url())
    monkeypatch.setattr(image_utils, "URL_MAX_BYTES", 100)
    with pytest.raises(ValueError, match="cap of 100 bytes"):
        image_utils.load_rgb_image(f"{image_server}/photo.png")


def test_an_unreachable_image_url_fails_only_its_item_in_a_pipeline_batch(image_server, monkeypatch):
    from transformers import pipeline

    from modeling_mqspn.pipeline_mqspn import TASK
    from test_pipeline import tiny_model_and_processor

    monkeypatch.setitem(sys.modules, "httpx", None)
    model, processor = tiny_model_and_processor()
    ner = pipeline(TASK, model=model, processor=processor, device="cpu")
    boxes = [[0, 0, 30, 30]]
    results = ner([
        {"id": "good", "text": "Messi in Paris", "image": f"{image_server}/photo.png", "boxes": boxes},
        {"id": "down", "text": "Messi in Paris", "image": closed_port_url(), "boxes": boxes},
    ], batch_size=2)
    assert isinstance(results[0], list) and results[0]
    assert results[1]["id"] == "down" and "unreachable" in results[1]["error"]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def test_predict_writes_one_row_per_input_and_evaluate_scores_the_error_rows(tmp_path, image_server, capsys):
    from PIL import Image

    from test_pipeline import load_example, save_tiny_checkpoint
    from test_proposers import paint_scene

    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint")
    folder = tmp_path / "in"
    folder.mkdir()
    paint_scene(folder / "good.jpg")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    Image.new("RGB", (30, 20)).save(folder / "vinvl_less.jpg")
    boxes = [[10, 10, 70, 100]]
    words = ["Messi", "in", "Paris"]
    lines = [
        json.dumps({"id": "good", "words": words, "image": "good.jpg", "boxes": boxes}),
        json.dumps({"id": "missing", "words": words, "image": "gone.jpg", "boxes": boxes}),
        json.dumps({"id": "corrupt", "words": words, "image": "corrupt.jpg", "boxes": boxes}),
        json.dumps({"id": "boxes-only", "words": words, "boxes": boxes}),
        json.dumps({"id": "no-vinvl", "words": words, "image": "vinvl_less.jpg"}),  # no .npz: the proposer fails
        "{not json",
        # a dataset JSONL row (docs/DATA.md), as train.py reads it: proposals, gold entities, image_size
        json.dumps({"id": "dataset", "words": words, "image": "good.jpg", "image_size": [160, 120],
                    "proposals": boxes, "entities": [{"start": 0, "end": 0, "type": "PER"}]}),
        json.dumps({"id": "url", "words": words, "image": f"{image_server}/photo.png", "boxes": [[0, 0, 20, 20]]}),
    ]
    (folder / "tweets.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "vinvl").mkdir()
    out = tmp_path / "out"
    predict = load_example("predict")
    argv = ["--model", checkpoint, "--input", str(folder / "tweets.jsonl"), "--output_dir", str(out),
            "--proposer", "vinvl", "--vinvl_dir", str(tmp_path / "vinvl"), "--batch_size", "3"]
    assert predict.main(argv) == 0
    captured = capsys.readouterr()
    assert "8 input(s), 5 failed" in captured.out
    rows = read_jsonl(out / "predictions.jsonl")
    assert [row["id"] for row in rows] == ["good", "missing", "corrupt", "boxes-only", "no-vinvl", "6", "dataset", "url"]
    failed = {row["id"] for row in rows if "error" in row}
    assert failed == {"missing", "corrupt", "boxes-only", "no-vinvl", "6"}
    assert all(("entities" in row) != ("error" in row) for row in rows)
    assert rows[-1]["image"] == f"{image_server}/photo.png"  # a URL is not turned into a local path
    assert sorted(p.name for p in (out / "images").iterdir()) == ["dataset.png", "good.png", "url.png"]
    assert predict.main(argv + ["--strict"]) == 1

    # evaluate.py: the dataset JSONL as references, the error rows scored as no prediction and counted
    references = tmp_path / "references.jsonl"
    references.write_text("".join(json.dumps({"id": row["id"], "words": words, "entities": [
        {"start": 0, "end": 0, "type": "PER"}]}) + "\n" for row in rows))
    evaluate = load_example("evaluate")
    scores = tmp_path / "scores.json"
    capsys.readouterr()
    assert evaluate.main(["--predictions", str(out / "predictions.jsonl"), "--references", str(references),
                          "--output", str(scores)]) == 0
    assert "5 of 8 prediction rows are errors" in capsys.readouterr().out
    result = json.loads(scores.read_text())
    assert result["failed_predictions"]["count"] == 5
    assert result["mner"]["counts"]["n_gold"] == 8


def test_predict_refuses_an_output_dir_that_is_a_file_before_computing(tmp_path, capsys, monkeypatch):
    from test_pipeline import load_example, save_tiny_checkpoint

    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint")
    (tmp_path / "taken").write_text("a file")
    predict = load_example("predict")
    monkeypatch.setattr(predict, "build_pipeline", lambda args: pytest.fail("the model was loaded"))
    assert predict.main(["--model", checkpoint, "--text", "Messi", "--output_dir", str(tmp_path / "taken")]) == 2
    assert "is a file" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Silent acceptance and errors that name the fix


TRAIN = str(ROOT / "examples" / "train.py")


def run_script(*argv, timeout=300):
    import os

    from conftest import run_process

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return run_process([sys.executable, *map(str, argv)], cwd=ROOT, env=env, timeout=timeout)


def one_line_error(done, *expected):
    """The script failed with exit code 2 and ONE stderr line starting with 'error:' holding `expected`."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr[-2000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_a_misspelt_model_config_field_is_refused_with_the_closest_field():
    from modeling_mqspn.tools.cli import UsageError, check_config_fields

    with pytest.raises(UsageError, match="'num_querys' is not an MQSPNConfig field; did you mean 'num_queries'"):
        check_config_fields({"num_querys": 40})
    check_config_fields({"num_queries": 40, "text_config": {}})  # valid keys pass


def load_train_script():
    return load_script("examples/train.py", "train_script_workflows")


def test_train_script_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    from modeling_mqspn.tools.cli import run_cli

    train = load_train_script()
    demo = ROOT / "configuration" / "demo.json"

    def refused(*argv):
        assert run_cli(train.main, [str(arg) for arg in argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error:"), err
        return err

    assert "'num_querys'" in refused("--config", demo, "--model_config", '{"num_querys": 40}')
    assert "does not exist" in refused("--config", tmp_path / "missing.json")
    assert "jsonl" in refused("--config", demo, "--dataset_format", "conll")
    # a data error raised inside train(), through the real script: one line, not two tracebacks
    one_line_error(run_script(TRAIN, "--config", demo, "--data_dir", tmp_path / "no_release", "--output_dir", tmp_path / "o"),
                   "no_release", "--data_dir")


def write_release(folder, train_ids=("1", "2"), dev_ids=("3",)):
    folder.mkdir(parents=True, exist_ok=True)
    for split, ids in (("train", train_ids), ("dev", dev_ids)):
        (folder / f"{split}.txt").write_text("".join(f"IMGID:{i}\nMessi\tB-PER\nwins\tO\n\n" for i in ids))
    return folder


def test_an_explicit_folder_that_does_not_exist_is_an_error_not_ignored(tmp_path):
    from modeling_mqspn.tools.training import load_splits

    release = write_release(tmp_path / "release")
    load_splits("twitter-gmner", str(release))  # the default folders (release/xml, ...) may be absent
    for flag in ("xml_dir", "images_dir", "vinvl_dir"):
        with pytest.raises(ValueError, match=f"--{flag} .*typo: does not exist"):
            load_splits("twitter-gmner", str(release), **{flag: str(tmp_path / "typo")})


def test_the_same_ids_in_train_and_dev_are_refused(tmp_path):
    from modeling_mqspn.tools.training import load_splits

    release = write_release(tmp_path / "release", train_ids=("1", "2"), dev_ids=("2", "3"))
    with pytest.raises(ValueError, match=r"1 dev id\(s\) are also train ids \('2'\)"):
        load_splits("twitter-gmner", str(release))


def test_a_derived_label_space_refuses_two_spellings_of_one_type(tmp_path, capsys):
    from modeling_mqspn.tools.training import load_splits, entity_types_of

    def row(i, entity_type):
        return json.dumps({"id": str(i), "words": ["Messi", "wins"], "entities": [{"start": 0, "end": 0, "type": entity_type}]})

    (tmp_path / "train.jsonl").write_text("\n".join([row(1, "PER"), row(2, "PER"), row(3, "per"), row(4, "LOC")]))
    (tmp_path / "dev.jsonl").write_text(row(9, "PER"))
    splits = load_splits("jsonl", train_file=str(tmp_path / "train.jsonl"), dev_file=str(tmp_path / "dev.jsonl"))
    with pytest.raises(ValueError, match="spells one type two ways: 'PER' .* and 'per'"):
        entity_types_of("jsonl", "coarse", splits["train"])
    (tmp_path / "train.jsonl").write_text("\n".join([row(1, "PER"), row(4, "LOC")]))
    splits = load_splits("jsonl", train_file=str(tmp_path / "train.jsonl"), dev_file=str(tmp_path / "dev.jsonl"))
    assert entity_types_of("jsonl", "coarse", splits["train"]) == ["LOC", "PER"]
    assert "label space from the training split" in capsys.readouterr().out


def test_report_to_tensorboard_without_tensorboard_is_refused(monkeypatch):
    import argparse

    from modeling_mqspn.tools import training
    from modeling_mqspn.tools.cli import UsageError

    args = argparse.Namespace(model_config={}, dataset_format="jsonl", report_to="tensorboard", ema_decay=None)
    monkeypatch.setattr(training, "tensorboard_available", lambda: False)
    with pytest.raises(UsageError, match="tensorboard is not installed"):
        training.check_arguments(args)
    monkeypatch.setattr(training, "tensorboard_available", lambda: True)
    training.check_arguments(args)


# --------------------------------------------------------------------------------------------------
# One data path


def test_build_dataset_output_trains_with_dataset_format_saved_and_old_flag_spellings_work(tmp_path, capsys):
    from processing import build_dataset
    from modeling_mqspn.tools.training import load_splits
    from modeling_mqspn.tools.demo_data import DemoDataConfig, generate_demo_release

    release = tmp_path / "release"
    generate_demo_release(release, seed=1, config=DemoDataConfig(num_train=4, num_dev=2, num_test=2))
    built = tmp_path / "built"
    assert build_dataset.main(["--dataset_format", "twitter-gmner", "--data_dir", str(release), "--split", "train",
                               "--output", str(built / "train"), "--images_dir", str(release / "images"),
                               "--vinvl_dir", str(release / "vinvl")]) == 0
    # the old spellings are aliases
    assert build_dataset.main(["--format", "twitter-gmner", "--data_dir", str(release), "--split", "dev",
                               "--output", str(built / "dev"), "--images", str(release / "images"),
                               "--vinvl", str(release / "vinvl")]) == 0
    splits = load_splits("saved", str(built))
    assert {split: len(dataset) for split, dataset in splits.items()} == {"train": 4, "dev": 2}
    assert any(row["proposals"] for row in splits["train"])
    with pytest.raises(ValueError, match="holds one saved Dataset"):
        load_splits("saved", str(built / "train"))


def test_max_train_and_eval_samples_cut_the_splits(tmp_path):
    train = load_train_script()
    release = write_release(tmp_path / "release", train_ids=("1", "2", "3", "4"), dev_ids=("5", "6", "7"))
    args = train.parse_args(["--config", str(ROOT / "configuration" / "demo.json"), "--data_dir", str(release),
                             "--max_train_samples", "3", "--max_eval_samples", "2"])
    splits = train.load_data(args, {})
    assert (len(splits["train"]), len(splits["dev"])) == (3, 2)


def test_help_texts_are_whole_sentences():
    import contextlib
    import io

    from processing import build_dataset
    from test_pipeline import load_example

    for name, main in (("build_dataset", build_dataset.main), ("predict", load_example("predict").main),
                       ("evaluate", load_example("evaluate").main), ("push_to_hub", load_example("push_to_hub").main)):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            main(["--help"])
        description = out.getvalue().split("\n\n")[1].strip()
        assert description.endswith((".", ":", ")")), f"{name} --help: {description!r}"


def load_space_app():
    pytest.importorskip("gradio")
    return load_script("examples/space/app.py", "space_app_workflows")


def test_space_gives_each_type_the_fixed_colour_of_visualize(tmp_path, capsys, restore_pipeline_registry):
    import contextlib
    import io

    import gradio as gr

    from modeling_mqspn.visualize import type_color
    from test_pipeline import export_tiny_checkpoint

    app = load_space_app()
    folder, _ = export_tiny_checkpoint(tmp_path)
    demo = app.build_demo(str(folder))
    (highlighted,) = [block for block in demo.blocks.values() if isinstance(block, gr.HighlightedText)]
    assert highlighted.color_map == {t: "#%02x%02x%02x" % type_color(t) for t in ("PER", "LOC", "ORG", "OTHER")}
    capsys.readouterr()

    with pytest.raises(SystemExit) as stopped:
        app.main(["--model", str(tmp_path / "runs" / "nope" / "best")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the folder does not exist" in err

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        app.main(["--help"])
    assert out.getvalue().split("\n\n")[1].strip().endswith(".")


def test_a_model_folder_that_does_not_exist_and_a_bad_device_are_one_line_errors(tmp_path, capsys):
    from processing import cache_region_features
    from test_pipeline import load_example, save_tiny_checkpoint

    missing = str(tmp_path / "runs" / "demo" / "best")
    predict, push = load_example("predict"), load_example("push_to_hub")
    eval_json = tmp_path / "eval.json"
    eval_json.write_text("{}")

    def one_line(code):
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error:"), err
        return err

    assert "the folder does not exist" in one_line(predict.main(["--model", missing, "--text", "x", "--output_dir", str(tmp_path / "o")]))
    assert "the folder does not exist" in one_line(push.main(["--model", missing, "--eval_results", str(eval_json),
                                                              "--repo_id", "a/b", "--dataset_name", "D", "--dataset_type", "d"]))
    with pytest.raises(SystemExit) as stopped:
        cache_region_features.main(["--model", missing, "--data", str(tmp_path), "--cache_dir", str(tmp_path / "c")])
    assert stopped.value.code == 2 and "the folder does not exist" in capsys.readouterr().err

    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint")
    capsys.readouterr()
    assert "not a device" in one_line(predict.main(["--model", checkpoint, "--text", "x", "--device", "gpu0",
                                                    "--output_dir", str(tmp_path / "o")]))
    import torch

    if not torch.cuda.is_available():
        assert "CUDA is not available" in one_line(predict.main(["--model", checkpoint, "--text", "x", "--device", "cuda",
                                                                 "--output_dir", str(tmp_path / "o")]))
        with pytest.raises(SystemExit):
            cache_region_features.main(["--model", checkpoint, "--data", str(tmp_path), "--cache_dir", str(tmp_path / "c"),
                                        "--device", "cuda"])
        assert "CUDA is not available" in capsys.readouterr().err


def test_the_model_card_states_only_facts_of_the_checkpoint_and_its_evaluation(tmp_path, capsys):
    from test_pipeline import load_example, save_tiny_checkpoint

    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint")  # 2 text layers, 1 vision layer
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    scores = {task: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "per_type": {}} for task in ("gmner", "mner", "eeg")}
    (run / "test_results.json").write_text(json.dumps(scores))
    push = load_example("push_to_hub")
    common = ["--model", checkpoint, "--eval_results", str(run / "test_results.json"),
              "--dataset_name", "MQSPN synthetic demo", "--dataset_type", "mqspn-demo"]
    assert push.main(common + ["--repo_id", "you/mqspn-demo", "--dry_run", str(tmp_path / "hub")]) == 0
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "English tweets" not in card and "1 layers" not in card
    assert "CLIP ViT, 1 layer," in card and "BERT, 2 layers," in card
    assert "written by `examples/train.py`" in card and "written by `examples/evaluate.py`" not in card
    assert "Evaluated on MQSPN synthetic demo (test split)" in card
    capsys.readouterr()
    for bad in ("exported/", "you/mqspn/demo", "mqspn demo"):
        assert push.main(common + ["--repo_id", bad, "--dry_run", str(tmp_path / "hub2")]) == 2
        assert "is not a Hub repo id" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Long runs


def test_prune_checkpoints_keeps_the_newest_and_never_best(tmp_path):
    from modeling_mqspn.tools.training import prune_checkpoints

    for step in (3, 6, 9, 12):
        (tmp_path / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    (tmp_path / "best").mkdir()
    removed = prune_checkpoints(str(tmp_path), 2)
    assert sorted(Path(p).name for p in removed) == ["step_00000003", "step_00000006"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000009", "step_00000012"]
    assert (tmp_path / "best").is_dir()
    assert prune_checkpoints(str(tmp_path), None) == []


def test_the_demo_recipe_writes_checkpoints():
    from modeling_mqspn.tools.training import load_recipe

    recipe = load_recipe(str(ROOT / "configuration" / "demo.json"))
    assert recipe["checkpointing_steps"] == "epoch" and recipe["save_total_limit"] >= 1
    assert "--resume_from_checkpoint" in (ROOT / "scripts" / "demo.sh").read_text()  # demo.sh keeps them then


@pytest.mark.slow
def test_a_resumed_run_continues_metrics_and_seconds_plots_and_prunes(tmp_path):
    """A run of 3 epochs (a checkpoint each, 2 kept) is resumed from its second checkpoint, as after a
    kill -9 that came after the third epoch's records: metrics.jsonl holds no record twice, `seconds`
    continues from the checkpoint, the PNG and the summary are written; no --tokenizer is needed."""
    from modeling_mqspn.tools.demo_data import DemoDataConfig, generate_demo_release
    from test_train import TINY_MODEL

    data = tmp_path / "data"
    generate_demo_release(data, seed=2, config=DemoDataConfig(num_train=8, num_dev=3, num_test=2,
                                                              min_image_size=48, max_image_size=64))
    out = tmp_path / "run"
    command = [TRAIN, "--config", ROOT / "configuration" / "demo.json", "--data_dir", data, "--output_dir", out,
               "--model_config", json.dumps(TINY_MODEL), "--batch_size", "4", "--eval_batch_size", "4",
               "--num_epochs", "3", "--logging_steps", "1", "--seed", "3"]
    first = run_script(*command, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "run finished in" in first.stdout and str(out) in first.stdout
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step_00000004", "step_00000006"]  # 2 steps per epoch, the newest 2 of 3
    state = json.loads((out / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["seconds"] > 0

    second = run_script(*command, "--resume_from_checkpoint", out / "checkpoints" / "step_00000004", timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    records = read_jsonl(out / "metrics.jsonl")
    keys = [(r.get("event"), r.get("split"), r["step"], "loss" in r) for r in records if r.get("event") != "start"]
    assert len(keys) == len(set(keys)), "a record is in metrics.jsonl twice"
    assert [r["resumed_from"] is not None for r in records if r.get("event") == "start"] == [False, True]
    seconds = [r["seconds"] for r in records if "seconds" in r]
    assert seconds == sorted(seconds), "seconds restarted from 0"
    from PIL import Image

    with Image.open(out / "metrics.png") as png:
        assert png.size == (1040, 360)


# --------------------------------------------------------------------------------------------------
# README and model card


def test_the_processor_warns_when_images_come_without_boxes_or_proposer(tmp_path):
    import warnings

    from test_pipeline import tiny_model_and_processor
    from test_proposers import paint_scene

    _, processor = tiny_model_and_processor()
    photo = paint_scene(tmp_path / "photo.jpg")
    with pytest.warns(UserWarning, match=r"1 of 2 tweet\(s\) have an image but no boxes and no proposer.*a"):
        inputs = processor(text=["Messi in Paris", "PSG wins"], images=[photo, photo], boxes=[None, [[0, 0, 30, 30]]],
                           ids=["a", "b"])
    assert inputs["region_mask"].sum(dim=1).tolist() == [0, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        processor(text=["Messi in Paris"], images=[photo], boxes=[[]])  # boxes=[] says "no regions": no warning
