"""`python -m allocator evaluate`: on a tiny-llama run made by the real search command, with the local lm-eval tasks
of tests/data/lm_eval_tasks (a multiple-choice and a loglikelihood task on JSONL files, no network)."""

import json
from pathlib import Path

import pytest
import torch

from allocator.app.evaluate_job import find_model_dir
from allocator.core.config import DataConfig
from allocator.model.byte_tokenizer import ByteTokenizer
from allocator.model.calibration_data import build_calibration_data, text_blocks
from allocator.model.quality import perplexity
from allocator.model.runtime import load_pruned

from .conftest import REPO, run_cli

TASKS = REPO / "tests" / "data" / "lm_eval_tasks"
DATA = ["data.seq_len=64", "data.calib_sequences=8", "data.eval_sequences=4"]
SEARCH = ["model=tiny-llama", "model.tiny_layers=3", "profile=h100", *DATA, "space.mlp_step=32",
          "space.fisher_sequences=4", "score.kl_sequences=4", "score.batch_size=4", "budget.speedup=1.3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run exported by `python -m allocator search` (profile=h100: a roofline table, so nothing is timed here)."""
    work = tmp_path_factory.mktemp("evaluate")
    searched = run_cli("search", *SEARCH, f"cache_dir={work / 'cache'}", f"hydra.run.dir={work / 'run'}", cwd=work)
    assert searched.returncode == 0, searched.stderr[-3000:]
    return work / "run"


def _evaluate(run_dir: Path, *args: str):
    done = run_cli("evaluate", f"run={run_dir}", *args, cwd=run_dir.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    written = Path(done.stdout.strip().splitlines()[-1].removeprefix("results: "))
    assert written.parent == run_dir / "evaluate" and written.suffix == ".json"
    return json.loads(written.read_text()), done.stdout


def test_tasks_and_heldout_perplexity_pruned_and_dense(run):
    result, stdout = _evaluate(run, f"tasks=[{TASKS}]", "batch_size=4")
    assert result["version"] == 1 and result["run"] == str(run) and result["model_dir"] == str(run / "export" / "native")
    assert result["tasks"] == ["allocator_facts_mc", "allocator_last_word"]
    text = result["perplexity_text"]
    assert text["sequences"] == 4 and text["seq_len"] == 64 and text["tokens"] == 256
    assert "held-out split" in text["source"] and result["environment"]["lm_eval"] == "0.4.13"

    # Perplexity: the same number allocator.model.quality gives on the run's held-out blocks, and the search's own.
    model, tokenizer, plan = load_pruned(run)
    heldout = build_calibration_data(DataConfig(seq_len=64, calib_sequences=8, eval_sequences=4), tokenizer).heldout
    pruned = result["models"]["pruned"]
    assert pruned["perplexity"] == pytest.approx(perplexity(model, heldout, 4), rel=1e-6)
    assert pruned["perplexity"] == pytest.approx(plan.quality.ppl_pruned, rel=1e-4)
    assert result["models"]["dense"]["perplexity"] == pytest.approx(plan.quality.ppl_dense, rel=1e-4)
    assert result["plan_quality"] == {"ppl_dense": plan.quality.ppl_dense, "ppl_pruned": plan.quality.ppl_pruned}

    for name in ("pruned", "dense"):
        tasks = result["models"][name]["tasks"]
        assert set(tasks) == {"allocator_facts_mc", "allocator_last_word"}
        mc, last = tasks["allocator_facts_mc"], tasks["allocator_last_word"]
        assert mc["samples"] == last["samples"] == 40
        assert set(mc["metrics"]) == {"acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"}
        assert 0.0 <= mc["metrics"]["acc,none"] <= 1.0 and last["metrics"]["perplexity,none"] > 1.0
    # A random model's pruned and dense log-likelihoods differ: the two columns are two models.
    assert (result["models"]["pruned"]["tasks"]["allocator_last_word"]["metrics"]["perplexity,none"]
            != result["models"]["dense"]["tasks"]["allocator_last_word"]["metrics"]["perplexity,none"])
    assert "allocator_facts_mc acc" in stdout and "perplexity" in stdout and "results:" in stdout


def test_perplexity_on_user_text(run, tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    result, _ = _evaluate(run, f"data={text}", "data.seq_len=32", "dense=false", "batch_size=3")
    model, tokenizer, _ = load_pruned(run)
    blocks = text_blocks([str(text)], tokenizer, 32)
    assert result["perplexity_text"]["sequences"] == len(blocks) == 1800 // 32
    assert result["models"]["pruned"]["perplexity"] == pytest.approx(perplexity(model, blocks, 3), rel=1e-6)
    assert "dense" not in result["models"] and result["tasks"] is None


def test_bad_task_name_and_missing_run_fail_in_one_line(run, tmp_path):
    bad = run_cli("evaluate", f"run={run}", "tasks=allocator_facts_mcq", f"include_path=[{TASKS}]", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "error: tasks: 'allocator_facts_mcq' is not an lm-eval task name" in bad.stderr
    assert "close: allocator_facts_mc" in bad.stderr
    missing = run_cli("evaluate", f"run={tmp_path / 'nope'}", cwd=tmp_path)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert f"error: run={tmp_path / 'nope'}: no such directory" in missing.stderr


def test_model_dir_of_each_layout(tmp_path):
    """A run with its export at the top (today), a run with export/native/, and an export directory itself."""
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "config.json").write_text("{}")
    assert find_model_dir(flat) == (flat, flat)
    nested = tmp_path / "nested"
    for fmt in ("native", "dense"):
        (nested / "export" / fmt).mkdir(parents=True)
        (nested / "export" / fmt / "config.json").write_text("{}")
    (nested / "search_job.yaml").write_text("{}")
    assert find_model_dir(nested) == (nested / "export" / "native", nested)
    assert find_model_dir(nested / "export" / "dense") == (nested / "export" / "dense", nested)
    (nested / "export" / "native" / "config.json").unlink()  # no native export: the dense one
    assert find_model_dir(nested) == (nested / "export" / "dense", nested)
    with pytest.raises(FileNotFoundError, match="holds no exported model"):
        find_model_dir(tmp_path)


def test_byte_tokenizer_as_transformers_tokenizer_gives_the_same_ids():
    byte = ByteTokenizer()
    fast = byte.to_transformers()
    for text in ("Hello, world!", "naïve café – 東京 🙂", "  two  spaces\n\tand <eos> literally"):
        assert fast.encode(text) == byte.encode(text) and fast.decode(byte.encode(text)) == text
    assert fast.eos_token_id == fast.pad_token_id == byte.eos_token_id and len(fast) == len(byte)
    batch = fast(["ab", "abcd"], padding="longest", return_tensors="pt")
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))


def test_model_in_original_architecture_loads_through_transformers(tmp_path, capsys):
    """An export directory without per-layer widths (a model transformers builds itself, as the `dense` export
    format writes) is loaded by transformers; without a plan.json no dense model is named, so none is evaluated."""
    from allocator.app.config import EvaluateJob, EvaluateText
    from allocator.app.evaluate_job import run_evaluate
    from allocator.core.config import ModelConfig
    from allocator.model.loader import load_model

    loaded = load_model(ModelConfig(name="tiny-llama"), tmp_path / "cache")
    model_dir = tmp_path / "export" / "dense"
    loaded.model.save_pretrained(model_dir)
    loaded.tokenizer.save_pretrained(model_dir)
    text = tmp_path / "text.md"
    text.write_text("# Notes\n\nSome words to score, twice over. " * 30)
    path = run_evaluate(EvaluateJob(run=str(model_dir), data=EvaluateText(path=str(text), seq_len=48)))
    result = json.loads(path.read_text())
    assert path.parent == model_dir / "evaluate" and result["model_dir"] == str(model_dir)
    blocks = text_blocks([str(text)], loaded.tokenizer, 48)
    assert result["models"]["pruned"]["perplexity"] == pytest.approx(perplexity(loaded.model, blocks, 8), rel=1e-6)
    assert list(result["models"]) == ["pruned"] and "no plan.json" in result["notes"][0]
    assert "results:" in capsys.readouterr().out
