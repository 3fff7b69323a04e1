"""The data pipeline without Ray: decoding, letterboxing, normalisation, augmentation, load_arrays."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffkd.data.augment import AugmentConfig, AugmentParams, draw_params, place
from diffkd.data.dataset import DatasetError, ImageDataset
from diffkd.data.pipeline import PipelineConfig, decode_batch, load_arrays, row_generators
from diffkd.data.schema import MODALITIES, ClinicalEncoding

SIZE = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ramp_dataset) -> ImageDataset:
    return ramp_dataset(tmp_path_factory.mktemp("pipe") / "ds")


def cfg(**kw) -> PipelineConfig:
    return PipelineConfig(image_size=SIZE, batch_size=8, **kw)


def raw_batch(ds: ImageDataset, center: str = "A", n: int = 8) -> dict[str, np.ndarray]:
    table = ds.read_table([center]).slice(0, n)
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


# ---- decode ----------------------------------------------------------------------------------------

def test_decode_gives_the_task_batch_contract(dataset):
    out = decode_batch(raw_batch(dataset), cfg(centers=("A", "B")))
    assert out["image"].shape == (8, 1, SIZE, SIZE) and out["image"].dtype == np.float32
    assert out["mask"].shape == (8, 1, SIZE, SIZE) and set(np.unique(out["mask"])) <= {0.0, 1.0}
    assert out["label"].dtype == np.int64 and out["label"].tolist() == [0, 1] * 4
    assert out["clinical"].shape == (8, ClinicalEncoding().width) and out["clinical"].dtype == np.float32
    assert out["center_idx"].tolist() == [0] * 8
    assert out["modality_idx"].tolist() == [MODALITIES.index("us")] * 8
    assert out["synthetic"].dtype == bool and not out["synthetic"].any()
    assert out["case_id"].tolist() == [f"real-A-{i}" for i in range(8)]
    # masks: known only on odd rows, and then non-empty
    assert out["mask"][0::2].sum() == 0 and (out["mask"][1::2].sum(axis=(1, 2, 3)) > 0).all()


def test_normalisation_is_the_fixed_rule_and_8_and_16_bit_agree(dataset):
    c = cfg()
    out = decode_batch(raw_batch(dataset), c)  # rows 0 and 4 are 16-bit PNGs of the same ramp
    image = out["image"][:, 0]
    black = (0.0 - c.norm_mean) / c.norm_std
    assert image.min() == pytest.approx(black, abs=1e-5)  # letterbox bars are black
    assert image.max() <= (1.0 - c.norm_mean) / c.norm_std + 1e-5
    eight = decode_batch({k: v[[0]] for k, v in raw_batch(dataset).items()}, c)
    assert out["image"][0].shape == eight["image"][0].shape
    # the same ramp stored at 8 bits (row 8 has the same size as row 0) decodes to the same values
    table = dataset.read_table(["B"]).slice(0, 1)
    ramp8 = decode_batch({n: table.column(n).to_numpy(zero_copy_only=False) for n in table.column_names}, c)
    np.testing.assert_allclose(ramp8["image"][0], out["image"][0], atol=0.05)


def test_letterbox_keeps_the_aspect_ratio_and_stretch_fills_the_canvas(dataset):
    batch = raw_batch(dataset, n=1)  # 40 x 60: bars above and below
    boxed = decode_batch(batch, cfg())["image"][0, 0]
    black = boxed.min()
    assert np.isclose(boxed[0], black).all() and np.isclose(boxed[-1], black).all()
    assert not np.isclose(boxed[SIZE // 2], black).all()
    stretched = decode_batch(batch, cfg(keep_aspect=False))["image"][0, 0]
    assert not np.isclose(stretched[0], black).all()


def test_unknown_centers_and_modalities_map_to_the_last_slot(dataset):
    c = cfg(centers=("B", "Z"))
    out = decode_batch(raw_batch(dataset), c)
    assert out["center_idx"].tolist() == [2] * 8 and c.num_center_slots == 3
    batch = raw_batch(dataset)
    batch["modality"] = np.array(["elastography"] * 8, dtype=object)
    assert decode_batch(batch, c)["modality_idx"].tolist() == [len(MODALITIES)] * 8


def test_three_channels_repeat_the_gray_image(dataset):
    out = decode_batch(raw_batch(dataset), cfg(in_chans=3))
    assert out["image"].shape == (8, 3, SIZE, SIZE)
    np.testing.assert_array_equal(out["image"][:, 0], out["image"][:, 2])


def test_a_corrupt_image_names_its_row(dataset):
    batch = raw_batch(dataset)
    batch["image"] = batch["image"].copy()
    batch["image"][3] = b"\x89PNG\r\n\x1a\n-truncated"
    with pytest.raises(ValueError, match="case_id=real-A-3"):
        decode_batch(batch, cfg())


# ---- augmentation ------------------------------------------------------------------------------------

def test_augmentation_never_flips_depth(dataset):
    """Brightness rises with depth in every source image; it must still rise after any augmentation."""
    batch = raw_batch(dataset)
    c = cfg(augmentation=AugmentConfig(hflip_p=0.5, rotate_deg=10, speckle_p=1.0))
    flips = 0
    for seed in range(12):
        rngs = row_generators(batch["case_id"], seed, epoch=0)
        flips += sum(draw_params(g, c.augmentation).flip for g in row_generators(batch["case_id"], seed, epoch=0))
        image = decode_batch(batch, c, rngs)["image"][:, 0]
        inner = image[:, :, SIZE // 4: 3 * SIZE // 4]  # away from the bars rotation brings in
        rows = inner.mean(axis=2)
        top, bottom = rows[:, SIZE // 4: SIZE // 2 - 2].mean(axis=1), rows[:, SIZE // 2 + 2: 3 * SIZE // 4].mean(axis=1)
        assert (bottom > top).all(), f"seed {seed}: depth gradient inverted"
    assert flips > 0  # horizontal flips did happen


def test_horizontal_flip_mirrors_left_right_only(depth_ramp):
    image = Image.fromarray(depth_ramp(32, 32))
    plain = np.asarray(place(image, 32, True, AugmentParams.identity(), Image.Resampling.BILINEAR))
    flipped = np.asarray(place(image, 32, True, AugmentParams(flip=True), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(flipped, plain[:, ::-1])


def test_augmentation_is_deterministic_per_seed_and_varies_across_seeds_and_epochs(dataset):
    batch, c = raw_batch(dataset), cfg()
    first = decode_batch(batch, c, row_generators(batch["case_id"], 7, 0))["image"]
    again = decode_batch(batch, c, row_generators(batch["case_id"], 7, 0))["image"]
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, decode_batch(batch, c, row_generators(batch["case_id"], 8, 0))["image"])
    assert not np.allclose(first, decode_batch(batch, c, row_generators(batch["case_id"], 7, 1))["image"])
    # a row's augmentation does not depend on its batch-mates
    half = {k: v[4:] for k, v in batch.items()}
    np.testing.assert_array_equal(decode_batch(half, c, row_generators(half["case_id"], 7, 0))["image"], first[4:])
    # masks move with their images: the augmented mask still covers bright-ish lesion pixels' location
    out = decode_batch(batch, c, row_generators(batch["case_id"], 7, 0))
    assert (out["mask"][1::2].sum(axis=(1, 2, 3)) > 0).all()


def test_evaluation_is_not_augmented(dataset):
    batch = raw_batch(dataset)
    plain = decode_batch(batch, cfg())["image"]
    np.testing.assert_array_equal(decode_batch(batch, cfg(augment=False), row_generators(batch["case_id"], 1, 0))["image"],
                                  plain)


# ---- load_arrays and filters -----------------------------------------------------------------------

def test_load_arrays_keeps_the_requested_order_and_filters(dataset):
    ids = ["real-B-3", "real-A-5", "real-C-1"]
    out = load_arrays(dataset, ids, cfg())
    assert out["case_id"].tolist() == ids
    assert out["center_idx"].tolist() == [1, 0, 2]  # vocabulary: the dataset's sorted real centers
    mammo = load_arrays(dataset, None, cfg(modalities=("mammo",)), centers=["C"])
    assert len(mammo["case_id"]) == 4 and set(mammo["modality_idx"]) == {MODALITIES.index("mammo")}
    none = load_arrays(dataset, None, cfg(modalities=("us_doppler",)), train=True)
    assert none["image"].shape == (0, 1, SIZE, SIZE) and none["clinical"].shape == (0, ClinicalEncoding().width)
    with pytest.raises(DatasetError, match="real-X-1"):
        load_arrays(dataset, ["real-A-1", "real-X-1"], cfg())
    augmented = load_arrays(dataset, ids, cfg(), train=True, epoch=3)
    assert not np.allclose(augmented["image"], out["image"])


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="modalities"):
        PipelineConfig(modalities=("xray",))
    with pytest.raises(ValueError, match="rotate_deg"):
        AugmentConfig(rotate_deg=90)
    with pytest.raises(ValueError, match="in_chans"):
        PipelineConfig(in_chans=2)
