"""GLUE: the TSV readers on the real files, fine-tuning mechanics, seeds, summaries and converted heads."""
from __future__ import annotations

import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from torch import nn

from normswap.assets import asset
from normswap.errors import NormswapError
from normswap.evaluation import glue, glue_data
from normswap.loading import load_tokenizer
from normswap.modules import DyT, RMSNorm
from test_eval_support import converted_folder, tiny_bert_folder, write_glue_dir


# --------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("task,n_train,n_dev,first_label", [
    ("sst2", 67_349, 872, 1), ("cola", 8_551, 1_043, 1), ("rte", 2_490, 277, 1), ("stsb", 5_749, 1_500, 5.0),
])
def test_real_glue_files_read_completely(task, n_train, n_dev, first_label):
    root = asset("glue")
    if not root.is_dir():
        pytest.skip("GLUE assets missing")
    spec = glue_data.task_spec(task)
    train, dev = glue_data.read_split(root, spec, "train"), glue_data.read_split(root, spec, "dev")
    assert (len(train), len(dev)) == (n_train, n_dev)  # counts from assets/README.md
    assert train[0].label == first_label
    assert len(train[0].texts) == (2 if task in ("rte", "stsb") else 1)


def test_task_names_and_aliases():
    assert glue_data.task_spec("SST-2").name == "sst2"
    assert glue_data.task_spec("STS-B").name == "stsb"
    assert glue_data.task_spec("mnli-mm").dev_file == "dev_mismatched.tsv"
    assert [t.name for t in glue_data.parse_tasks("sst2, cola,SST-2")] == ["sst2", "cola"]
    with pytest.raises(NormswapError, match="unknown GLUE task 'squad'"):
        glue_data.parse_tasks("sst2,squad")


def test_missing_folder_split_and_bad_labels(tmp_path):
    glue_dir = write_glue_dir(tmp_path, 8, 4)
    sst2 = glue_data.task_spec("sst2")
    with pytest.raises(NormswapError, match="no RTE/ folder"):
        glue_data.split_file(glue_dir, glue_data.task_spec("rte"), "train")
    (glue_dir / "SST-2" / "dev.tsv").unlink()
    with pytest.raises(NormswapError, match="no dev.tsv"):
        glue_data.read_split(glue_dir, sst2, "dev")
    (glue_dir / "SST-2" / "train.tsv").write_text("sentence\tlabel\nfine film\t1\nodd film\tpositive\n")
    with pytest.raises(NormswapError, match=r"train.tsv:3: label 'positive'"):
        glue_data.read_split(glue_dir, sst2, "train")
    (glue_dir / "SST-2" / "train.tsv").write_text("text\tgold\nfine film\t1\n")
    with pytest.raises(NormswapError, match="lacks the sst2 columns"):
        glue_data.read_split(glue_dir, sst2, "train")
    with pytest.raises(NormswapError, match="not found"):
        glue_data.task_dir(tmp_path / "nowhere", sst2)


def test_subsample_is_fixed_and_in_file_order(tmp_path):
    rows = glue_data.read_split(write_glue_dir(tmp_path, 50, 4), glue_data.task_spec("cola"), "train")
    a, b = glue_data.subsample(rows, 20, seed=0), glue_data.subsample(rows, 20, seed=0)
    assert [r.row for r in a] == [r.row for r in b] == sorted(r.row for r in a)
    assert [r.row for r in glue_data.subsample(rows, 20, seed=1)] != [r.row for r in a]
    assert len(glue_data.subsample(rows, 500)) == 50


# -------------------------------------------------------------------------------------- summaries


def _run(metrics: dict[str, float], seed: int = 0) -> glue.GlueRun:
    return glue.GlueRun("stsb", seed, metrics, [])


def test_summary_mean_std_delta_and_average():
    conv = [_run({"pearson": v, "spearmanr": v - 0.1}, k) for k, v in enumerate([0.8, 0.7, 0.75])]
    base = [_run({"pearson": v, "spearmanr": v - 0.1}, k) for k, v in enumerate([0.85, 0.83, 0.84])]
    s = glue.summarise(conv, base)
    assert s["pearson"]["mean"] == pytest.approx(0.75)
    assert s["pearson"]["std"] == pytest.approx(np.std([0.8, 0.7, 0.75], ddof=1))
    assert s["pearson"]["baseline_mean"] == pytest.approx(0.84)
    assert s["pearson"]["delta"] == pytest.approx(-0.09)
    assert s["spearmanr"]["seeds"] == pytest.approx([0.7, 0.6, 0.65])
    avg = glue.glue_average({"stsb": s, "sst2": {"accuracy": {"mean": 0.9, "baseline_mean": 0.8, "delta": 0.1}}})
    assert avg["mean"] == pytest.approx(statistics.fmean([0.7, 0.9]))  # (0.75 + 0.65) / 2, then over tasks
    assert avg["delta"] == pytest.approx(avg["mean"] - statistics.fmean([0.79, 0.8]))
    assert glue.summarise(conv[:1], None)["pearson"] == {"mean": 0.8, "std": 0.0, "seeds": [0.8]}


def _loop_ci(metric_fn, conv_preds, base_preds, labels, resamples, seed):
    """The GLUE delta interval written plainly: per resample, each seed's metric on the same indices, averaged per model."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    d = []
    for _ in range(resamples):
        idx = rng.integers(0, len(labels), len(labels))
        c = np.mean([metric_fn(labels[idx], np.asarray(p)[idx]) for p in conv_preds])
        b = np.mean([metric_fn(labels[idx], np.asarray(p)[idx]) for p in base_preds])
        d.append(c - b)
    return [np.percentile(d, 2.5), np.percentile(d, 97.5)]


def _scored_run(task, seed, preds, labels):
    from normswap.evaluation.metrics import compute_glue_metrics

    return glue.GlueRun(task, seed, compute_glue_metrics(task, preds, labels), list(preds), references=list(labels))


def test_summary_delta_interval_equals_a_direct_loop_and_flags_noise():
    from sklearn.metrics import accuracy_score, matthews_corrcoef

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 120).tolist()
    noisy = lambda p_right: [y if rng.random() < p_right else 1 - y for y in labels]  # noqa: E731
    conv = [_scored_run("cola", s, noisy(0.80), labels) for s in range(3)]
    base = [_scored_run("cola", s, noisy(0.78), labels) for s in range(2)]
    row = glue.summarise(conv, base, resamples=300, seed=4)["matthews_correlation"]
    want = _loop_ci(matthews_corrcoef, [r.predictions for r in conv], [r.predictions for r in base], labels, 300, 4)
    assert row["delta_ci95"] == pytest.approx(want, abs=1e-12)
    assert row["noise_floor"] == pytest.approx(statistics.stdev(r.metrics["matthews_correlation"] for r in base))
    contains_zero = row["delta_ci95"][0] <= 0 <= row["delta_ci95"][1]
    assert row["within_noise"] == (contains_zero or abs(row["delta"]) <= 2 * row["noise_floor"])
    # the existing keys are untouched
    assert row["delta"] == pytest.approx(row["mean"] - row["baseline_mean"])
    assert {"mean", "std", "seeds", "baseline_mean", "baseline_std", "delta", "baseline_seeds"} <= set(row)
    # default resamples and seed are 1000 and 0; explicit labels give the same as the runs' own
    acc = [_scored_run("sst2", 0, noisy(0.9), labels)], [_scored_run("sst2", 0, noisy(0.7), labels)]
    default = glue.summarise(*acc)["accuracy"]
    assert default["delta_ci95"] == pytest.approx(_loop_ci(accuracy_score, [acc[0][0].predictions], [acc[1][0].predictions], labels, 1000, 0),
                                                  abs=1e-12)
    assert glue.summarise(*acc, references=labels)["accuracy"]["delta_ci95"] == default["delta_ci95"]
    # a single baseline seed has no noise floor: only the interval decides, and this one clearly excludes 0
    assert default["noise_floor"] is None and default["delta_ci95"][0] > 0 and default["within_noise"] is False


def test_summary_of_identical_models_is_within_noise_and_of_runs_without_predictions_has_no_interval():
    rng = np.random.default_rng(1)
    labels = rng.uniform(0, 5, 60).round(1).tolist()
    preds = (np.asarray(labels) + rng.normal(0, 1, 60)).tolist()
    same = glue.summarise([_scored_run("stsb", 0, preds, labels)], [_scored_run("stsb", 0, preds, labels)])
    for metric in ("pearson", "spearmanr"):
        assert same[metric]["delta_ci95"] == [0.0, 0.0] and same[metric]["within_noise"] is True
    conv = [_run({"pearson": v, "spearmanr": v}, k) for k, v in enumerate([0.80, 0.81])]
    base = [_run({"pearson": v, "spearmanr": v}, k) for k, v in enumerate([0.70, 0.72])]
    row = glue.summarise(conv, base)["pearson"]
    assert row["delta_ci95"] is None and row["noise_floor"] == pytest.approx(statistics.stdev([0.70, 0.72]))
    assert row["within_noise"] is False  # 0.095 > 2 x 0.014
    one = glue.summarise(conv[:1], base[:1])["pearson"]
    assert one["delta_ci95"] is None and one["noise_floor"] is None and one["within_noise"] is None
    with pytest.raises(ValueError, match="different dev labels"):
        glue.summarise([_scored_run("stsb", 0, preds, labels)], [_scored_run("stsb", 0, preds, labels[::-1])])


def test_reference_protocol_table_is_the_documented_one():
    """The README's reference-protocol table (the settings its measured figures came from) and
    glue.REFERENCE_PROTOCOL agree row by row; every setting validates."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("The reference protocol (all-MiniLM-L6-v2"):]
    rows = {}
    for line in section.splitlines()[2:]:
        if not line.startswith("| ") or line.startswith("| task") or line.startswith("|---"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        name = {"SST-2": "sst2", "STS-B": "stsb", "RTE": "rte", "CoLA": "cola"}[cells[0]]
        train = None if "(all)" in cells[1] else int(cells[1].split()[0].replace(",", ""))
        rows[name] = (train, float(cells[2]), float(cells[3]), int(cells[4]), int(cells[5]), int(cells[6]))
    p = glue.REFERENCE_PROTOCOL
    assert rows == {t: (s.train_samples, s.epochs, s.lr, s.batch_size, s.max_seq_length, s.seeds) for t, s in p.items()}
    for s in p.values():
        s.validate()


def test_settings_are_validated():
    with pytest.raises(NormswapError, match="--epochs"):
        glue.GlueSettings(epochs=0).validate()
    with pytest.raises(NormswapError, match="--batch-size"):
        glue.GlueSettings(batch_size=-1).validate()


# ------------------------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    plain = tiny_bert_folder(root)
    return {"plain": plain, "rms": converted_folder(plain, "rmsnorm", root / "tiny-rms"),
            "dyt": converted_folder(plain, "dyt", root / "tiny-dyt"), "glue": write_glue_dir(root), "tok": load_tokenizer(str(plain))}


FAST = glue.GlueSettings(epochs=4, lr=2e-3, batch_size=16, max_seq_length=32)


def _encoded(tiny, task):
    spec = glue_data.task_spec(task)
    return (spec, glue.encode(tiny["tok"], glue_data.read_split(tiny["glue"], spec, "train"), 32),
            glue.encode(tiny["tok"], glue_data.read_split(tiny["glue"], spec, "dev"), 32))


def test_finetuning_learns_a_learnable_task_and_is_seeded(tiny):
    spec, train, dev = _encoded(tiny, "sst2")
    a = glue.run_task_seed(str(tiny["plain"]), tiny["tok"], spec, train, dev, FAST, seed=0)
    assert a.steps == 4 * 6 and a.train_examples == 96 and len(a.predictions) == 40
    assert a.metrics["accuracy"] >= 0.9  # the positive/negative word decides the label
    b = glue.run_task_seed(str(tiny["plain"]), tiny["tok"], spec, train, dev, glue.GlueSettings(**{**FAST.to_dict(), "epochs": 1}), seed=0)
    c = glue.run_task_seed(str(tiny["plain"]), tiny["tok"], spec, train, dev, glue.GlueSettings(**{**FAST.to_dict(), "epochs": 1}), seed=0)
    assert b.predictions == c.predictions and b.metrics == c.metrics


def test_regression_task_predicts_scores(tiny):
    spec, train, dev = _encoded(tiny, "stsb")
    run = glue.run_task_seed(str(tiny["rms"]), tiny["tok"], spec, train, dev, glue.GlueSettings(epochs=1, batch_size=32, max_seq_length=32), seed=1)
    assert set(run.metrics) == {"pearson", "spearmanr"}
    assert all(isinstance(p, float) for p in run.predictions) and len(set(run.predictions)) > 1
    assert run.references == dev.labels  # what the summary's paired bootstrap scores against


@pytest.mark.parametrize("kind,cls", [("rms", RMSNorm), ("dyt", DyT)])
def test_converted_models_keep_their_norms_under_a_new_head(tiny, kind, cls):
    spec = glue_data.task_spec("rte")
    model = glue.load_classifier(str(tiny[kind]), spec, seed=0)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.classifier.out_features == 2 and model.config.id2label == {0: "entailment", 1: "not_entailment"}
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert sum(isinstance(m, cls) for m in model.modules()) == 5  # embeddings + 2 per layer


def test_plain_model_gets_a_head_of_the_task_size(tiny):
    model = glue.load_classifier(str(tiny["plain"]), glue_data.task_spec("stsb"), seed=0)
    assert model.classifier.out_features == 1
    assert sum(isinstance(m, nn.LayerNorm) for m in model.modules()) == 5


def test_seed_fixes_the_head_initialisation(tiny):
    spec = glue_data.task_spec("sst2")
    w = [glue.load_classifier(str(tiny["rms"]), spec, seed=s).classifier.weight.detach().clone() for s in (0, 0, 1)]
    assert (w[0] == w[1]).all() and not (w[0] == w[2]).all()


def test_model_without_a_classification_head_is_a_user_error(tmp_path):
    from transformers import ViTConfig, ViTModel

    folder = tmp_path / "vit"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)).save_pretrained(folder)
    with pytest.raises(NormswapError, match="no sequence-classification head"):
        glue.load_classifier(str(folder), glue_data.task_spec("sst2"), seed=0)
