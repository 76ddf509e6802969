"""compress.calibration: text sources, seeded non-overlapping windows, evaluation windows.

Windows are cut from the first 20 KB of the shared WikiText-2 validation text, tokenized with
the demo model's tokenizer. `hf:` sources are tested through a stand-in for
`datasets.load_dataset` (this machine has no Hub); the real loader is the same call.
"""

from __future__ import annotations

import collections
import itertools
from pathlib import Path

import pytest
import torch

from compress.calibration import (
    HFSource,
    calibration_batches,
    calibration_device,
    check_calibration_source,
    describe_windows,
    evaluation_windows,
    load_text,
    non_overlapping_offsets,
    parse_hf_spec,
    token_windows,
    tokenize,
    window_bos,
)
from compress.errors import BadInputError, DataError
from compress.recipe import CalibrationConfig
from tests.conftest import SHARED_DATA

VALID_TXT = SHARED_DATA / "wikitext-2" / "valid.txt"
TEXT_BYTES = 20_000


@pytest.fixture(scope="module")
def text() -> str:
    if not VALID_TXT.is_file():
        pytest.skip(f"WikiText-2 validation text not found at {VALID_TXT} (shared data)")
    with VALID_TXT.open(encoding="utf-8") as f:
        return f.read(TEXT_BYTES)


@pytest.fixture(scope="module")
def stream(text: str, demo_tokenizer) -> torch.Tensor:
    return tokenize(text, demo_tokenizer)


def window_starts(windows: torch.Tensor, stream: torch.Tensor) -> list[int]:
    """Where each window occurs in the token stream (the first match)."""
    every = stream.unfold(0, windows.shape[1], 1)  # (positions, seq_len)
    starts = []
    for window in windows:
        hits = (every == window).all(dim=1).nonzero().flatten()
        assert hits.numel() > 0, "a window that is not a slice of the token stream"
        starts.append(int(hits[0]))
    return starts


# --------------------------------------------------------------------------- token_windows


def test_windows_have_exact_shape_and_dtype(text: str, demo_tokenizer) -> None:
    windows = token_windows(text, demo_tokenizer, num_samples=8, seq_len=64, seed=0)
    assert windows.shape == (8, 64)
    assert windows.dtype == torch.int64


def test_same_seed_same_windows_other_seed_other_windows(text: str, demo_tokenizer) -> None:
    first = token_windows(text, demo_tokenizer, 8, 64, seed=0)
    again = token_windows(text, demo_tokenizer, 8, 64, seed=0)
    other = token_windows(text, demo_tokenizer, 8, 64, seed=1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_windows_are_non_overlapping_slices_of_the_stream(
    text: str, demo_tokenizer, stream: torch.Tensor
) -> None:
    seq_len = 64
    windows = token_windows(text, demo_tokenizer, 16, seq_len, seed=3)
    starts = sorted(window_starts(windows, stream))
    assert all(b - a >= seq_len for a, b in itertools.pairwise(starts))
    assert starts[-1] + seq_len <= stream.numel()


def test_windows_spread_over_the_text_not_only_its_start(
    text: str, demo_tokenizer, stream: torch.Tensor
) -> None:
    windows = token_windows(text, demo_tokenizer, 4, 32, seed=0)
    assert max(window_starts(windows, stream)) > stream.numel() // 2


def test_an_exact_fit_tiles_the_whole_stream() -> None:
    for seed in range(5):
        assert sorted(non_overlapping_offsets(100, 4, 25, seed).tolist()) == [0, 25, 50, 75]


def test_a_near_fit_uses_every_window_it_can(
    text: str, demo_tokenizer, stream: torch.Tensor
) -> None:
    seq_len = 50
    count = stream.numel() // seq_len  # fewer than seq_len tokens left over
    windows = token_windows(text, demo_tokenizer, count, seq_len, seed=7)
    starts = sorted(window_starts(windows, stream))
    assert len(starts) == count
    assert all(b - a >= seq_len for a, b in itertools.pairwise(starts))


def test_offsets_are_uniform_over_all_placements() -> None:
    # 7 tokens, 2 windows of 2: C(3 + 2, 2) = 10 possible placements, each equally likely.
    counts = collections.Counter(
        tuple(sorted(non_overlapping_offsets(7, 2, 2, seed).tolist())) for seed in range(4000)
    )
    assert len(counts) == 10
    assert all(a + 2 <= b for a, b in counts)
    assert min(counts.values()) > 300 and max(counts.values()) < 500


def test_too_many_tokens_states_available_and_requested(
    text: str, demo_tokenizer, stream: torch.Tensor
) -> None:
    available = stream.numel()
    seq_len = 512
    num_samples = available // seq_len + 1
    with pytest.raises(DataError) as excinfo:
        token_windows(text, demo_tokenizer, num_samples, seq_len, seed=0, source="valid.txt")
    message = str(excinfo.value)
    assert f"{available:,} tokens" in message
    assert f"{num_samples * seq_len:,}" in message
    assert "valid.txt" in message


def test_non_positive_sizes_are_rejected(text: str, demo_tokenizer) -> None:
    with pytest.raises(ValueError, match="seq_len"):
        token_windows(text, demo_tokenizer, 1, 0, seed=0)


# --------------------------------------------------------------------------- calibration_batches


def test_calibration_batches_follow_the_recipe(tmp_path: Path, text: str, demo_tokenizer) -> None:
    path = tmp_path / "calib.txt"
    path.write_text(text, encoding="utf-8")
    cfg = CalibrationConfig(path=str(path), num_samples=4, seq_len=32, seed=5)
    batches = calibration_batches(cfg, demo_tokenizer)
    assert torch.equal(batches, token_windows(text, demo_tokenizer, 4, 32, seed=5))


def test_calibration_shortfall_names_the_file(tmp_path: Path, demo_tokenizer) -> None:
    path = tmp_path / "short.txt"
    path.write_text("only a few words here", encoding="utf-8")
    cfg = CalibrationConfig(path=str(path), num_samples=2, seq_len=512)
    with pytest.raises(DataError, match=r"^calibration: .*short\.txt holds \d+ tokens"):
        calibration_batches(cfg, demo_tokenizer)


def test_missing_file_names_path_and_recipe_field(tmp_path: Path, demo_tokenizer) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError) as excinfo:
        calibration_batches(CalibrationConfig(path=str(missing)), demo_tokenizer)
    assert "calibration.path" in str(excinfo.value)
    assert str(missing) in str(excinfo.value)


def test_cheap_source_check_needs_no_model_and_no_network(tmp_path: Path) -> None:
    present = tmp_path / "calib.txt"
    present.write_text("text", encoding="utf-8")
    check_calibration_source(CalibrationConfig(path=str(present)))
    check_calibration_source(CalibrationConfig(path="hf:wikitext:wikitext-2-raw-v1:validation"))
    with pytest.raises(DataError, match=r"^calibration\.path: .*nope\.txt"):
        check_calibration_source(CalibrationConfig(path=str(tmp_path / "nope.txt")))
    with pytest.raises(DataError, match=r"^calibration\.path: "):
        check_calibration_source(CalibrationConfig(path="hf:wikitext"))


def test_non_utf8_and_empty_files_are_data_errors(tmp_path: Path) -> None:
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_text(str(latin))
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n", encoding="utf-8")
    with pytest.raises(DataError, match="no text"):
        load_text(str(empty))


# --------------------------------------------------------------------------- hf: sources


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            "hf:wikitext:wikitext-2-raw-v1:validation:text",
            HFSource("wikitext", "wikitext-2-raw-v1", "validation", "text"),
        ),
        (
            "hf:wikitext:wikitext-2-raw-v1:validation",
            HFSource("wikitext", "wikitext-2-raw-v1", "validation", "text"),
        ),
        ("hf:org/corpus:train", HFSource("org/corpus", None, "train", "text")),
        ("hf:org/corpus::train:content", HFSource("org/corpus", None, "train", "content")),
        ("hf:allenai/c4:en:train[:1000]", HFSource("allenai/c4", "en", "train[:1000]", "text")),
        ("hf:allenai/c4:en:train[10:20%]:text", HFSource("allenai/c4", "en", "train[10:20%]")),
    ],
)
def test_hf_specs_parse(spec: str, expected: HFSource) -> None:
    assert parse_hf_spec(spec) == expected


@pytest.mark.parametrize(
    "spec",
    ["hf:", "hf:wikitext", "hf:a:b:c:d:e", "hf::train", "hf:a:cfg::text", "hf:a:cfg:train:"],
)
def test_bad_hf_specs_are_data_errors_with_the_field(spec: str) -> None:
    with pytest.raises(DataError, match=r"^calibration\.path: "):
        parse_hf_spec(spec)


@pytest.fixture()
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Replace datasets.load_dataset with a tiny in-memory dataset; records the calls."""
    import datasets

    calls: list[tuple] = []

    def load_dataset(path: str, name: str | None = None, *, split: str) -> datasets.Dataset:
        calls.append((path, name, split))
        if path == "missing/dataset":
            raise FileNotFoundError(f"Dataset '{path}' doesn't exist on the Hub")
        rows = ["first row", "", " = Heading = ", None, "last row"]
        return datasets.Dataset.from_dict({"text": rows, "id": list(range(len(rows)))})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hf_source_loads_and_joins_rows(fake_hub: list[tuple]) -> None:
    text = load_text("hf:wikitext:wikitext-2-raw-v1:validation:text")
    assert fake_hub == [("wikitext", "wikitext-2-raw-v1", "validation")]
    assert text == "first row\n\n = Heading = \n\nlast row"


def test_hf_source_errors_name_the_source(fake_hub: list[tuple]) -> None:
    with pytest.raises(DataError, match=r"no column 'body'; columns: \['text', 'id'\]"):
        load_text("hf:org/corpus::train:body")
    with pytest.raises(DataError, match="column holds int"):
        load_text("hf:org/corpus::train:id")
    with pytest.raises(DataError, match=r"calibration\.path: cannot load 'hf:missing/dataset"):
        load_text("hf:missing/dataset:train")


# --------------------------------------------------------------------------- evaluation_windows


def test_evaluation_windows_are_consecutive_and_deterministic(
    text: str, demo_tokenizer, stream: torch.Tensor
) -> None:
    windows = evaluation_windows(text, demo_tokenizer, seq_len=128)
    count = stream.numel() // 128
    assert windows.shape == (count, 128) and windows.dtype == torch.int64
    assert torch.equal(windows.flatten(), stream[: count * 128])
    assert torch.equal(windows, evaluation_windows(text, demo_tokenizer, seq_len=128))


def test_evaluation_windows_cap_and_shortfall(text: str, demo_tokenizer) -> None:
    capped = evaluation_windows(text, demo_tokenizer, seq_len=128, max_windows=3)
    assert torch.equal(capped, evaluation_windows(text, demo_tokenizer, 128)[:3])
    few = evaluation_windows(text, demo_tokenizer, seq_len=1024, max_windows=1000)
    assert 0 < len(few) < 1000  # a cap, not a demand (a warning is logged)
    with pytest.raises(DataError, match="fewer than one window"):
        evaluation_windows("a few words", demo_tokenizer, seq_len=512)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_calibration_device_without_cuda_is_refused_naming_the_field():
    assert calibration_device("auto") == torch.device("cpu")
    assert calibration_device("cpu") == torch.device("cpu")
    with pytest.raises(BadInputError, match=r"calibration\.device: 'cuda:1'"):
        calibration_device("cuda:1")


# --------------------------------------------------------------------------- BOS convention


def test_the_window_convention_is_read_from_the_tokenizer(demo_tokenizer, bos_tokenizer) -> None:
    assert window_bos(demo_tokenizer) is None
    assert window_bos(bos_tokenizer) == bos_tokenizer.bos_token_id is not None
    assert describe_windows(demo_tokenizer)["starts_with_bos"] is False
    described = describe_windows(bos_tokenizer)
    assert described["starts_with_bos"] is True
    assert described["bos_token"] == bos_tokenizer.bos_token


def test_calibration_windows_start_with_bos_then_text(text: str, bos_tokenizer) -> None:
    bos = bos_tokenizer.bos_token_id
    windows = token_windows(text, bos_tokenizer, 6, 64, seed=3)
    assert windows.shape == (6, 64)
    assert (windows[:, 0] == bos).all()
    stream = tokenize(text, bos_tokenizer).tolist()
    starts = []
    for row in windows[:, 1:].tolist():  # 63 consecutive text tokens each, at distinct places
        start = next(i for i in range(len(stream)) if stream[i : i + 63] == row)
        starts.append(start)
    spans = sorted((s, s + 63) for s in starts)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))


def test_evaluation_windows_with_bos_score_every_text_token_once(text: str, bos_tokenizer) -> None:
    windows = evaluation_windows(text, bos_tokenizer, 32, max_windows=5)
    assert windows.shape == (5, 32)
    assert (windows[:, 0] == bos_tokenizer.bos_token_id).all()
    stream = tokenize(text, bos_tokenizer)
    assert torch.equal(windows[:, 1:].reshape(-1), stream[: 5 * 31])


def test_a_window_with_no_room_after_bos_is_a_data_error(text: str, bos_tokenizer) -> None:
    with pytest.raises(DataError, match="no room for text after the tokenizer's BOS"):
        evaluation_windows(text, bos_tokenizer, 1)


def test_without_bos_windows_are_text_only(text: str, demo_tokenizer) -> None:
    windows = evaluation_windows(text, demo_tokenizer, 32, max_windows=2)
    assert torch.equal(windows.reshape(-1), tokenize(text, demo_tokenizer)[:64])
