"""Data sources, the short-document policy, fingerprints and splits (byte tokenizer; no model needed)."""

import json
import sys
import types

import numpy as np
import pytest

from calibrate import data


@pytest.fixture()
def docs_jsonl(tmp_path):
  path = tmp_path / "docs.jsonl"
  texts = ["a" * 10, "b" * 3, "c" * 4, "d" * 12, "e" * 2]
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  return path


def test_short_documents_skip_or_concat(docs_jsonl):
  tok = data.ByteTokenizer()
  skip = data.load_samples(docs_jsonl, tok, 8, 2, short="skip")
  assert [bytes(r.tolist()).decode() for r in skip.ids] == ["a" * 8, "d" * 8]
  concat = data.load_samples(docs_jsonl, tok, 8, 2, short="concat")
  # Documents too short for a sample are joined with the next ones (the byte tokenizer has no EOS to put between).
  assert [bytes(r.tolist()).decode() for r in concat.ids] == ["a" * 8, "bbbccccd"]
  with pytest.raises(data.DataError, match=r"found only 2 usable documents with at least 8 tokens \(of 5 documents\)"):
    data.load_samples(docs_jsonl, tok, 8, 3, short="skip")


def test_stream_fingerprint_and_split(tmp_path):
  path = tmp_path / "s.txt"
  path.write_text("0123456789" * 10)
  s = data.load_samples(path, data.ByteTokenizer(), 10, 8)
  assert s.ids.shape == (8, 10) and bytes(s.ids[1].tolist()) == b"0123456789"
  assert s.fingerprint() == data.load_samples(path, data.ByteTokenizer(), 10, 8).fingerprint()
  assert s.fingerprint() != data.load_samples(path, data.ByteTokenizer(), 10, 7).fingerprint()
  cal, held = data.split_samples(s.ids, 0.75)
  assert cal.shape[0] == 6 and held.shape[0] == 2
  np.testing.assert_array_equal(np.concatenate([cal, held]), s.ids)  # held-out rows are other stream pieces
  with pytest.raises(data.DataError, match="model's vocabulary has 50 entries"):
    data.check_vocab(s.ids, 50, "bytes")


def test_jsonl_without_text_field(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"body": "xyz"}) + "\n")
  with pytest.raises(data.DataError, match="has no 'text' field"):
    data.load_samples(path, data.ByteTokenizer(), 4, 1)
  assert np.asarray(data.load_samples(path, data.ByteTokenizer(), 2, 1, text_field="body").ids).shape == (1, 2)


def test_hub_dataset_name_reads_through_datasets(monkeypatch):
  """A name that is not a path goes to `datasets.load_dataset(name, config, split=..., streaming=True)`.

  `datasets` is not a dependency (and the hub is unreachable here), so a stand-in module records the calls.
  """
  calls, records = [], [{"text": "x" * 3}, {"text": "y" * 9}, {"text": "z" * 12}]

  def load_dataset(name, config, *, split, streaming):
    calls.append((name, config, split, streaming))
    return iter(records)

  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
  s = data.load_samples("wikitext:wikitext-103-raw-v1", data.ByteTokenizer(), 8, 2, split="test")
  assert calls == [("wikitext", "wikitext-103-raw-v1", "test", True)]
  assert [bytes(r.tolist()).decode() for r in s.ids] == ["y" * 8, "z" * 8]  # the 3-byte document is skipped
  records[:] = [{"book": "..."}]
  with pytest.raises(data.DataError, match=r"dataset 'pg19' has no 'text' field \(fields: \['book'\]\)"):
    data.load_samples("pg19", data.ByteTokenizer(), 4, 1)
  assert calls[-1] == ("pg19", None, "validation", True)
