"""Report datasets by URI (on JSONL files the tests write by hand): round trips, unlabeled
files, the built-in modalities, seeded splits, and errors that name file:line."""

import json

import pytest

from rpe_jax.tasks import report
from rpe_jax.tasks import report_data
from rpe_jax.tasks.images import DatasetError
from rpe_jax.tasks.report import Report


def _write(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                  encoding="utf-8")
  return path


def test_jsonl_round_trip(tmp_path):
  rows = [{"findings": "Liver is normal.", "impression": "Normal."},
          {"findings": "Nodule\u2028in the lung — 4 mm.", "impression": "Small nodule."},
          {"findings": "Effusion.", "impression": "Pleural effusion.", "extra": 1}]
  text = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows[:2]) + "\n\n  \n" + \
      json.dumps(rows[2]) + "\n"
  (tmp_path / "r.jsonl").write_text(text, encoding="utf-8", newline="")
  ds = report_data.load("jsonl:r.jsonl", "all", data_root=str(tmp_path))
  assert ds.name == "jsonl:r.jsonl" and len(ds) == 3
  assert ds.findings == [r["findings"] for r in rows]   # U+2028 inside a string is no line end
  assert ds.impressions == [r["impression"] for r in rows]
  assert ds.reports[1] == Report(rows[1]["findings"], rows[1]["impression"])
  again = report_data.load(f"jsonl:{tmp_path / 'r.jsonl'}", "all")   # absolute: no data root
  assert again.reports == ds.reports


def test_unlabeled_jsonl(tmp_path):
  _write(tmp_path / "u.jsonl", [{"findings": f"finding {i}"} for i in range(4)])
  ds = report_data.load("jsonl:u.jsonl", "all", data_root=str(tmp_path))
  assert ds.impressions is None and ds.findings == [f"finding {i}" for i in range(4)]
  assert all(r.impression is None for r in ds.reports)
  # The training encoder refuses them; the default reader still requires impressions.
  codec = report.Codec(tokenizer=None, pad_id=0, bos_id=1, eos_id=2)
  with pytest.raises(ValueError, match=r"reports\[0\] has no impression"):
    report.encode_examples(codec, ds.reports, 32)
  with pytest.raises(ValueError, match=r"u.jsonl:1: 'impression' must be a non-empty string"):
    report.read_jsonl(tmp_path / "u.jsonl")
  # write_jsonl leaves the key out for them, so the file reads back the same.
  path = report.write_jsonl(tmp_path / "w.jsonl", ds.reports)
  assert report.read_jsonl(path, require_impression=False) == list(ds.reports)
  assert "impression" not in path.read_text()


def test_jsonl_splits_partition_the_dataset(tmp_path):
  _write(tmp_path / "r.jsonl", [{"findings": f"f{i}", "impression": f"i{i}"} for i in range(20)])
  uri = f"jsonl:{tmp_path / 'r.jsonl'}"
  splits = report_data.load_splits(uri, seed=3)
  assert [len(s) for s in splits] == [14, 3, 3]
  ids = [[int(f[1:]) for f in s.findings] for s in splits]
  assert sorted(sum(ids, [])) == list(range(20))           # disjoint, union = all
  for s, i in zip(splits, ids):
    assert s.impressions == [f"i{k}" for k in i]           # impressions follow
    assert i == sorted(i)                                  # file order within a split
  assert [s.name for s in splits] == [f"{uri}[train]", f"{uri}[val]", f"{uri}[test]"]
  assert report_data.load(uri, "test", seed=3) == splits.test
  assert report_data.load_splits(uri, seed=4).train != splits.train


def test_builtin_modalities():
  a, b = report_data.load_splits("reports:ct_chest"), report_data.load_splits("reports:ct_chest")
  assert a == b and [len(s) for s in a] == [96, 32, 32]
  whole = report_data.load("reports:ct_chest", "all", seed=2)
  assert list(whole.reports) == report.synthetic_reports("ct_chest", report_data.PER_MODALITY, 2)
  assert whole.impressions is not None and whole.name == "reports:ct_chest"
  assert sorted(report_data.load("reports:ct_chest", "all").reports) == sorted(sum(
      (list(s.reports) for s in a), []))
  family = report_data.members("reports:synthetic")
  assert family == [f"reports:{m}" for m in sorted(report.MODALITIES)]
  assert report_data.members("jsonl:x.jsonl") == ["jsonl:x.jsonl"]
  with pytest.raises(DatasetError, match="mixes reports with and without impressions"):
    report_data.ReportDataset((Report("a", "b"), Report("c", None)), "mixed")


# --- errors name file:line ------------------------------------------------------------------

_OK = {"findings": "x", "impression": "y"}


@pytest.mark.parametrize("lines, named", [
    ([_OK, "{nope"], "r.jsonl:2: not valid JSON"),
    (["[1, 2]"], "r.jsonl:1: expected a JSON object, got list"),
    ([_OK, _OK, {"impression": "y"}], "r.jsonl:3: 'findings' must be a non-empty string"),
    ([{"findings": "  ", "impression": "y"}], "r.jsonl:1: 'findings' must be a non-empty"),
    ([{"findings": 5, "impression": "y"}], "r.jsonl:1: 'findings' must be a non-empty"),
    ([_OK, {"findings": "x", "impression": None}], "r.jsonl:2: 'impression' must be a non-empty"),
    ([{"findings": "x", "impression": 3}], "r.jsonl:1: 'impression' must be a non-empty"),
    ([{"findings": "x", "impression": ""}], "r.jsonl:1: 'impression' must be a non-empty"),
    ([_OK, "", {"findings": "x"}], "r.jsonl:3: has no 'impression' but line 1 has one"),
    ([{"findings": "x"}, _OK], "r.jsonl:2: has an 'impression' but line 1 has none"),
    ([], "r.jsonl: no reports"),
    (["", "   "], "r.jsonl: no reports"),
])
def test_bad_lines_are_named(tmp_path, lines, named):
  _write(tmp_path / "r.jsonl", lines)
  with pytest.raises(DatasetError) as e:
    report_data.load("jsonl:r.jsonl", data_root=str(tmp_path))
  assert named in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bad_files_are_named(tmp_path):
  (tmp_path / "latin1.jsonl").write_bytes(
      json.dumps(_OK).encode() + b'\n{"findings": "caf\xe9", "impression": "y"}\n')
  (tmp_path / "folder.jsonl").mkdir()
  for name, named in (("latin1.jsonl", "latin1.jsonl:2: not UTF-8 text (byte 0xe9)"),
                      ("missing.jsonl", "missing.jsonl: no such file"),
                      ("folder.jsonl", "folder.jsonl: cannot read")):
    with pytest.raises(DatasetError) as e:
      report_data.load(f"jsonl:{name}", "all", data_root=str(tmp_path))
    assert named in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("uri, message", [
    ("ct_chest", "has no scheme"),
    ("masks:x", "unknown report dataset URI scheme 'masks'"),
    ("jsonl:", "names no dataset"),
    ("reports:synthetic", "family of modalities; load one of: reports:"),
    ("reports:pet_heart", "unknown modality 'pet_heart'"),
])
def test_bad_uris_are_named(uri, message):
  with pytest.raises(DatasetError, match=message):
    report_data.load(uri)


def test_bad_split_is_named():
  with pytest.raises(DatasetError, match="split must be one of"):
    report_data.load("reports:ct_chest", "dev")
