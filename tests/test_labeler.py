from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from diffcxr_aug.cli import app
from diffcxr_aug.data.chexbert import CHEXBERT_CONDITIONS, CheXbert, CheXbertLabeler
from diffcxr_aug.data.labeler import KeywordLabeler, RuleLabeler, label_reports_file
from diffcxr_aug.data.labels import CHEXPERT_LABELS

runner = CliRunner()


@pytest.fixture(scope="module")
def labeler() -> RuleLabeler:
    return RuleLabeler()


def _positive(labels: dict) -> dict:
    return {k: v for k, v in labels.items() if not math.isnan(v)}


def test_matches_the_hand_labelled_chexpert_reports(labeler, fixtures_dir):
    truth = pd.read_csv(fixtures_dir / "chexpert" / "labeled_reports.csv")
    for _, row in truth.iterrows():
        got = labeler(row["Reports"])
        for name in CHEXPERT_LABELS:
            expected = row[name]
            assert (math.isnan(got[name]) and pd.isna(expected)) or got[name] == expected, (row["Reports"], name)


@pytest.mark.parametrize(
    "report, expected",
    [
        # negation, with a list under one cue
        (
            "No pneumothorax, pleural effusion, or focal consolidation.",
            {"Pneumothorax": 0, "Pleural Effusion": 0, "Consolidation": 0, "No Finding": 1},
        ),
        # sentence scope: the negation of one sentence does not reach the next
        ("No pleural effusion. Small right pneumothorax.", {"Pleural Effusion": 0, "Pneumothorax": 1}),
        # clause scope: "but" ends the cue's reach
        ("No edema but there is a right lower lobe consolidation.", {"Edema": 0, "Consolidation": 1}),
        # uncertainty, and positive + uncertain mentions of one observation aggregate to positive
        ("Possible left effusion. Right pleural effusion is present.", {"Pleural Effusion": 1}),
        ("Possible left basilar atelectasis.", {"Atelectasis": -1}),
        # pre-negation uncertainty beats the negation word inside it
        ("Pneumonia cannot be excluded.", {"Pneumonia": -1}),
        ("No new consolidation.", {"Consolidation": -1}),
        # pseudo-negation: "no change in" keeps the finding
        ("No change in the small left pleural effusion.", {"Pleural Effusion": 1}),
        # post-mention negation and CheXpert's "stable silhouette" uncertainty
        (
            "Heart size is normal. The mediastinal contours are stable.",
            {"Cardiomegaly": 0, "Enlarged Cardiomediastinum": -1},
        ),
        ("The heart is mildly enlarged.", {"Cardiomegaly": 1}),
        # "X or Y" hedges both
        (
            "Opacity at the left base, atelectasis or pneumonia.",
            {"Lung Opacity": 1, "Atelectasis": -1, "Pneumonia": -1},
        ),
        # CheXpert's conventions: a bare "compatible with" states, "is compatible with" hedges, and
        # vascular congestion only suggests edema
        ("Right lower lobe opacity, compatible with pneumonia.", {"Lung Opacity": 1, "Pneumonia": 1}),
        ("The opacity is compatible with pneumonia.", {"Lung Opacity": 1, "Pneumonia": -1}),
        ("Mild pulmonary vascular congestion. No pulmonary edema.", {"Edema": -1}),
        # CHF adds an uncertain cardiomegaly; devices do not block No Finding
        ("Findings consistent with CHF.", {"Edema": 1, "Cardiomegaly": -1}),
        ("Right PICC line tip in the SVC. Lungs are clear.", {"Support Devices": 1, "No Finding": 1}),
        # positional unmention: a catheter in the heart is not cardiomegaly
        ("Pacemaker leads terminate in the right heart.", {"Support Devices": 1, "No Finding": 1}),
        # word boundaries: "consistent" is not a stent, "plate-like" atelectasis is not a device plate
        ("Plate-like atelectasis, consistent with scarring.", {"Atelectasis": 1, "Lung Opacity": 1}),
        # "other findings" of the No Finding list block No Finding without adding a label
        ("Calcified granuloma in the right upper lobe.", {}),
        ("", {"No Finding": 1}),
    ],
)
def test_rules(labeler, report, expected):
    assert _positive(labeler(report)) == {k: float(v) for k, v in expected.items()}


def test_keyword_baseline_ignores_negation():
    assert _positive(KeywordLabeler()("No pneumothorax.")) == {"Pneumothorax": 1.0}


def test_real_iu_reports_agree_with_mesh_better_than_keywords():
    from diffcxr_aug.data.adapters.iu_xray import read_iu_reports
    from diffcxr_aug.evaluation.labeler_eval import default_iu_archive, iu_report_texts, mesh_agreement

    reports = read_iu_reports(default_iu_archive()).sort_values("uid").iloc[:600]
    texts = iu_report_texts(reports)
    rule = mesh_agreement(RuleLabeler().label(texts, progress=False), reports["mesh_major"].tolist())
    keyword = mesh_agreement(KeywordLabeler().label(texts, progress=False), reports["mesh_major"].tolist())
    rule_f1, keyword_f1 = rule["f1"].iloc[-1], keyword["f1"].iloc[-1]
    assert rule_f1 > 0.6 and rule_f1 > keyword_f1 + 0.2, (rule_f1, keyword_f1)


def test_label_reports_file_and_cli(tmp_path):
    reports = tmp_path / "reports.csv"
    pd.DataFrame(
        {"ID": ["a", "b"], "report": ["No pneumothorax. Small left effusion.", "Possible pneumonia."]}
    ).to_csv(reports, index=False)
    out = tmp_path / "labels.csv"
    result = runner.invoke(app, ["label", "--reports", str(reports), "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(table.columns) == ["ID", *CHEXPERT_LABELS]
    assert table.loc[0, "Pneumothorax"] == "0" and table.loc[0, "Pleural Effusion"] == "1"
    assert table.loc[1, "Pneumonia"] == "-1" and table.loc[1, "Edema"] == ""


def test_missing_text_column_names_it_and_lists_columns(tmp_path):
    reports = tmp_path / "reports.csv"
    pd.DataFrame({"ID": ["a"], "text": ["No effusion."]}).to_csv(reports, index=False)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['report'\]; found columns \['ID', 'text'\]"):
        label_reports_file(reports, tmp_path / "out.csv")
    result = runner.invoke(app, ["label", "--reports", str(reports), "--out", str(tmp_path / "o.csv")])
    assert result.exit_code == 2 and "['report']" in result.output and "Traceback" not in result.output


# --- CheXbert on a tiny randomly initialised BERT saved locally ----------------------------------------


def _tiny_bert_folder(folder):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = "no yes pneumothorax effusion small left right pneumonia possible heart size normal . ,".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *"abcdefghijklmnopqrstuvwxyz"]
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    config.save_pretrained(folder)
    torch.manual_seed(0)
    return CheXbert(BertModel(config)).eval()


def test_chexbert_loads_the_official_checkpoint_format(tmp_path):
    model = _tiny_bert_folder(tmp_path / "tiny-bert")
    checkpoint = tmp_path / "tiny-bert" / "chexbert.pth"
    # The official file: nn.DataParallel keys ("module." prefix) under "model_state_dict".
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, checkpoint)

    labeler = CheXbertLabeler.from_checkpoint(checkpoint, device="cpu")  # config + tokenizer from its folder
    reports = ["No pneumothorax.", "Small left effusion, possible pneumonia.", "Heart size normal."]
    frame = labeler.label(reports, batch_size=2, progress=False)
    assert list(frame.columns) == list(CHEXPERT_LABELS) and len(frame) == 3
    batch = labeler.tokenizer(reports, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"])
    classes = torch.stack([h.argmax(1) for h in logits], 1).numpy()
    expected = np.select([classes == 1, classes == 2, classes == 3], [1.0, 0.0, -1.0], np.nan)
    np.testing.assert_array_equal(frame[list(CHEXBERT_CONDITIONS)].to_numpy(), expected)
    assert set(np.unique(frame["No Finding"].dropna())) <= {1.0}  # the 2-class head never says 0

    reports_csv = tmp_path / "reports.csv"
    pd.DataFrame({"ID": [1, 2, 3], "report": reports}).to_csv(reports_csv, index=False)
    result = runner.invoke(
        app,
        ["label", "--reports", str(reports_csv), "--out", str(tmp_path / "o.csv"), "--checkpoint", str(checkpoint)],
    )
    assert result.exit_code == 0, result.output
    written = pd.read_csv(tmp_path / "o.csv")
    np.testing.assert_array_equal(written[list(CHEXPERT_LABELS)].to_numpy(dtype=float), frame.to_numpy(dtype=float))


def test_chexbert_rejects_mismatched_weights(tmp_path):
    model = _tiny_bert_folder(tmp_path / "tiny-bert")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("linear_heads.13")}
    torch.save({"model_state_dict": state}, tmp_path / "tiny-bert" / "broken.pth")
    with pytest.raises(ValueError, match=r"missing \['linear_heads.13"):
        CheXbertLabeler.from_checkpoint(tmp_path / "tiny-bert" / "broken.pth", device="cpu")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="expected CheXbert weights"):
        CheXbertLabeler.from_checkpoint(tmp_path / "other.pth", device="cpu")


def test_phantom_agreement_is_reported_per_label():
    from diffcxr_aug.evaluation.labeler_eval import evaluate_phantom, phantom_markdown

    results = evaluate_phantom(n=150, seed=1)
    rule, keyword = results["rule"], results["keyword"]
    assert rule["label"].tolist() == [*CHEXPERT_LABELS, "mean"]
    assert rule["agreement"].iloc[-1] > 0.9 and rule["agreement"].iloc[-1] > keyword["agreement"].iloc[-1] + 0.1
    assert "| Pneumothorax |" in phantom_markdown(results)
