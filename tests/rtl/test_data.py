"""Tests for rtl.data: digits and their corruption environments, the INR image task, CIFAR loaders and clusters."""

import pickle

import numpy as np
import pytest
import torch

from rtl.data import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    CIFAR100_CLUSTERS,
    CIFAR_MEAN,
    CIFAR_STD,
    CORRUPTIONS,
    INR_IMAGES,
    CIFARTensorDataset,
    DigitsSplit,
    cifar100_cluster_partition,
    cifar_dataset,
    corrupt,
    load_cifar,
    load_digits_split,
    load_inr_image,
    make_environment_split,
)
from rtl.data import digits as digits_module

NUM_DIGITS = 1797


@pytest.fixture(scope="module")
def split():
    return load_digits_split(test_fraction=0.25, seed=0)


# ----------------------------------------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_range(split):
    assert split.x_train.shape == (1347, 1, 8, 8) and split.x_test.shape == (450, 1, 8, 8)
    assert split.y_train.shape == (1347,) and split.y_test.shape == (450,)
    assert split.x_train.dtype == torch.float32 and split.y_train.dtype == torch.int64
    for x in (split.x_train, split.x_test):
        assert x.min() == 0.0 and x.max() == 1.0  # 0..16 scaled by 16: full ink reaches exactly 1
    assert set(split.y_train.tolist()) == set(range(10))


def test_digits_split_is_a_partition_of_the_dataset(split):
    from sklearn.datasets import load_digits

    full = torch.from_numpy(load_digits().images).to(torch.float32).reshape(NUM_DIGITS, 64) / 16.0
    ours = torch.cat([split.x_train, split.x_test]).reshape(NUM_DIGITS, 64)

    def canonical(rows):  # order rows lexicographically so two multisets of images compare equal
        keys = [tuple(r) for r in rows.tolist()]
        return sorted(keys)

    assert canonical(ours) == canonical(full)


@pytest.mark.parametrize("test_fraction", [0.25, 0.1, 0.5])
def test_digits_split_is_stratified(test_fraction):
    s = load_digits_split(test_fraction=test_fraction, seed=3)
    counts_test = torch.bincount(s.y_test, minlength=10).double()
    counts_all = counts_test + torch.bincount(s.y_train, minlength=10).double()
    assert (counts_test - counts_all * len(s.y_test) / NUM_DIGITS).abs().max() <= 1.0


def test_digits_split_is_deterministic_per_seed(split):
    again = load_digits_split(test_fraction=0.25, seed=0)
    other = load_digits_split(test_fraction=0.25, seed=1)
    assert torch.equal(again.x_train, split.x_train) and torch.equal(again.y_test, split.y_test)
    assert not torch.equal(other.x_train, split.x_train)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, True, "0.2"])
def test_digits_bad_test_fraction(bad):
    with pytest.raises(ValueError, match="test_fraction must be a number in"):
        load_digits_split(test_fraction=bad)


@pytest.mark.parametrize("bad", [-1, 1.0, None])
def test_digits_bad_seed(bad):
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        load_digits_split(seed=bad)


def _random_images(n, seed, dtype=torch.float32, low=0.05, high=0.95):
    g = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("kind", CORRUPTIONS)
@pytest.mark.parametrize("n", [1, 7, 33])
def test_corrupt_is_deterministic_in_range_and_changes_images(kind, n):
    x = _random_images(n, seed=n)
    before = x.clone()
    a, b = corrupt(x, kind, seed=5), corrupt(x, kind, seed=5)
    assert torch.equal(a, b)
    assert torch.equal(x, before), "corrupt must not modify its input"
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0.0 and a.max() <= 1.0
    changed = (a - x).abs().flatten(1).amax(dim=1)
    assert (changed > 0).all(), "every image must differ from the clean one"


@pytest.mark.parametrize("kind", ["noise", "occlusion"])
def test_corrupt_random_kinds_depend_on_seed(kind):
    x = _random_images(16, seed=1)
    assert not torch.equal(corrupt(x, kind, seed=0), corrupt(x, kind, seed=1))


def test_corrupt_blur_ignores_seed_and_matches_float64_reference():
    x = _random_images(5, seed=2, dtype=torch.float64)
    out = corrupt(x, "blur", seed=0)
    assert torch.equal(out, corrupt(x, "blur", seed=9))
    g = torch.exp(-torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64) / (2 * digits_module.BLUR_SIGMA**2))
    kernel = torch.outer(g, g) / torch.outer(g, g).sum()
    img = x[:, 0]
    ref = torch.zeros_like(img)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            rows = (torch.arange(8) + di).clamp(0, 7)  # replicate padding: the nearest border pixel
            cols = (torch.arange(8) + dj).clamp(0, 7)
            ref += kernel[di + 1, dj + 1] * img[:, rows][:, :, cols]
    torch.testing.assert_close(out[:, 0], ref, rtol=1e-12, atol=1e-12)


def test_corrupt_noise_has_the_documented_strength():
    x = 0.45 + 0.1 * _random_images(400, seed=3)  # about mid-grey
    diff = (corrupt(x, "noise", seed=0) - x).double()
    # What clipping to [0, 1] leaves of N(0, sigma) noise on these images, from an independent float64 sample.
    z = torch.randn((50,) + x.shape, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    ref = (x.double() + digits_module.NOISE_SIGMA * z).clamp(0, 1) - x.double()
    assert abs(diff.std().item() - ref.std().item()) < 0.005
    assert abs(diff.mean().item() - ref.mean().item()) < 0.005


def test_corrupt_occlusion_writes_one_patch_per_image():
    x = _random_images(50, seed=4)  # values in (0.05, 0.95): every patch pixel visibly changes
    out = corrupt(x, "occlusion", seed=0)
    size = digits_module.OCCLUSION_SIZE
    positions = set()
    for i in range(len(x)):
        changed = (out[i, 0] != x[i, 0]).nonzero()
        assert len(changed) == size * size
        (r0, c0), (r1, c1) = changed.min(dim=0).values.tolist(), changed.max(dim=0).values.tolist()
        assert (r1 - r0, c1 - c0) == (size - 1, size - 1), "the changed pixels must form one square patch"
        assert (out[i, 0, r0 : r1 + 1, c0 : c1 + 1] == digits_module.OCCLUSION_FILL).all()
        positions.add((r0, c0))
    assert len(positions) > 5, "patch positions must vary between images"


def test_corrupt_empty_batch_and_float64():
    for kind in CORRUPTIONS:
        assert corrupt(torch.rand(0, 1, 8, 8), kind).shape == (0, 1, 8, 8)
        assert corrupt(_random_images(3, 0, torch.float64), kind).dtype == torch.float64


def test_corrupt_errors():
    x = _random_images(2, seed=0)
    with pytest.raises(ValueError, match="kind must be one of .*'fog'"):
        corrupt(x, "fog")
    with pytest.raises(ValueError, match=r"x must have shape \(N, 1, 8, 8\), got \(2, 8, 8\)"):
        corrupt(x[:, 0], "noise")
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.int64"):
        corrupt(torch.ones(2, 1, 8, 8, dtype=torch.int64), "noise")
    with pytest.raises(ValueError, match="seed must be a non-negative int, got -3"):
        corrupt(x, "blur", seed=-3)


def test_environment_split_is_balanced_and_corrupts_by_environment(split):
    envs = make_environment_split(split, seed=1)
    assert envs.environments == CORRUPTIONS
    for offset, (x, y, env, clean_x, clean_y) in enumerate(
        (
            (envs.x_train, envs.y_train, envs.env_train, split.x_train, split.y_train),
            (envs.x_test, envs.y_test, envs.env_test, split.x_test, split.y_test),
        )
    ):
        assert x.shape == clean_x.shape and env.shape == y.shape and env.dtype == torch.int64
        assert torch.equal(y, clean_y), "labels keep the split's order"
        counts = torch.bincount(env, minlength=3)
        assert counts.max() - counts.min() <= 1
        for c in range(10):
            per_class = torch.bincount(env[y == c], minlength=3)
            assert per_class.max() - per_class.min() <= 1, f"class {c} is not spread over the environments"
        for k, kind in enumerate(CORRUPTIONS):
            rows = env == k
            # Documented stream: train uses 2*seed, test 2*seed + 1.
            expected = corrupt(clean_x[rows], kind, seed=2 * 1 + offset)
            assert torch.equal(x[rows], expected)


def test_environment_split_is_deterministic_and_seeded(split):
    a, b = make_environment_split(split, seed=0), make_environment_split(split, seed=0)
    c = make_environment_split(split, seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.env_test, b.env_test)
    assert not torch.equal(a.env_train, c.env_train)
    assert not torch.equal(a.env_train[: len(a.env_test)], a.env_test), "train and test draw separate streams"


def test_environments_are_distinguishable(split):
    envs = make_environment_split(split, seed=0)
    # A mean absolute difference to the clean image per environment; each corruption leaves its own footprint.
    diffs = (envs.x_test - split.x_test).abs().flatten(1).mean(dim=1)
    means = [diffs[envs.env_test == k].mean().item() for k in range(3)]
    assert all(m > 0.02 for m in means)
    assert len({round(m, 3) for m in means}) == 3


def test_environment_split_errors(split):
    with pytest.raises(TypeError, match="split must be a DigitsSplit"):
        make_environment_split((split.x_train, split.y_train))
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        make_environment_split(split, seed=-1)
    assert isinstance(split, DigitsSplit)


# -------------------------------------------------------------------------------------------------------- INR image


def _check_inr(inr, h, w, r, min_fraction=0.02):
    assert inr.image.shape == (h, w, 3) and inr.image.dtype == torch.float32
    assert inr.image.min() >= 0 and inr.image.max() <= 1
    assert inr.coords.shape == (h * w, 2) and inr.coords.dtype == torch.float32
    assert inr.coords.min() == -1 and inr.coords.max() == 1
    # Row-major, (x = column, y = row): first pixel top-left, pixel w-1 top-right, last bottom-right.
    assert inr.coords[0].tolist() == [-1.0, -1.0]
    assert inr.coords[w - 1].tolist() == [1.0, -1.0]
    assert inr.coords[(h - 1) * w].tolist() == [-1.0, 1.0]
    assert inr.coords[-1].tolist() == [1.0, 1.0]
    assert torch.equal(inr.pixels, inr.image.reshape(-1, 3))
    assert inr.regions.shape == (h * w,) and inr.regions.dtype == torch.int64
    sizes = torch.bincount(inr.regions, minlength=r)
    assert len(sizes) == r and (sizes >= min_fraction * h * w).all()
    assert (sizes[:-1] >= sizes[1:]).all(), "region 0 is the largest, ids by decreasing size"
    assert inr.region_names == [f"region_{k}" for k in range(r)] and inr.num_regions == r
    assert inr.shape == (h, w)


def test_inr_astronaut_default_shapes_and_determinism():
    a = load_inr_image("astronaut", size=32, num_regions=6, seed=0)
    _check_inr(a, 32, 32, 6)
    b = load_inr_image("astronaut", size=32, num_regions=6, seed=0)
    assert torch.equal(a.regions, b.regions) and torch.equal(a.image, b.image)
    assert a.name == "astronaut"


@pytest.mark.parametrize(
    "name,size,r", [("camera", 24, 3), ("chelsea", (17, 23), 5), ("logo", 20, 4), ("horse", 16, 2), ("coffee", 21, 1)]
)
def test_inr_other_images(name, size, r):
    inr = load_inr_image(name, size=size, num_regions=r)
    h, w = (size, size) if isinstance(size, int) else size
    _check_inr(inr, h, w, r)
    if name == "camera":  # grey replicated to 3 channels
        assert torch.equal(inr.image[..., 0], inr.image[..., 1]) and torch.equal(inr.image[..., 0], inr.image[..., 2])


def test_inr_square_crop_keeps_the_centre():
    # A 20 x 40 image whose outer columns are red and centre 20 columns blue: an int size crops the centre square.
    img = np.zeros((20, 40, 3))
    img[..., 0] = 1.0
    img[:, 10:30] = (0.0, 0.0, 1.0)
    inr = load_inr_image(img, size=10, num_regions=1)
    torch.testing.assert_close(inr.image, torch.tensor([0.0, 0.0, 1.0]).expand(10, 10, 3))
    assert inr.name == "array"


def _two_halves(h, w, seed):
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3))
    img[:, : w // 2] = (0.9, 0.2, 0.1)
    img[:, w // 2 :] = (0.1, 0.3, 0.9)
    return np.clip(img + 0.03 * rng.standard_normal(img.shape), 0, 1)


def test_inr_regions_follow_colour_and_specks_join_their_surroundings():
    img = _two_halves(24, 24, seed=0)
    img[5:7, 3:5] = (0.1, 0.3, 0.9)  # a 2x2 speck of the right half's colour inside the left half
    inr = load_inr_image(img, size=24, num_regions=2, seed=0, min_piece_pixels=5)
    regions = inr.regions.view(24, 24)
    assert (regions[:, :12] == regions[0, 0]).all(), "the left half, speck included, is one region"
    assert (regions[:, 12:] == regions[0, -1]).all() and regions[0, 0] != regions[0, -1]
    # Without the clean-up (pieces of 1 pixel are kept) the speck keeps the colour class of the right half.
    kept = load_inr_image(img, size=24, num_regions=2, seed=0, min_piece_pixels=1).regions.view(24, 24)
    assert (kept[5:7, 3:5] == kept[0, -1]).all()


def test_inr_tiny_region_is_merged_and_largest_split():
    img = _two_halves(32, 32, seed=1)
    img[10:13, 5:8] = (0.1, 0.9, 0.1)  # 9 green pixels: its own colour class, but < 2 % of 1,024 pixels
    inr = load_inr_image(img, size=32, num_regions=3, seed=0, position_weight=0.0)
    _check_inr(inr, 32, 32, 3)
    regions = inr.regions.view(32, 32)
    assert (regions[10:13, 5:8] == regions[11, 9]).all(), "the green speck joins the region around it"


def test_inr_one_region_is_the_whole_image():
    inr = load_inr_image("camera", size=8, num_regions=1)
    assert (inr.regions == 0).all()


def test_inr_torch_tensor_input():
    img = torch.from_numpy(_two_halves(12, 12, seed=2))
    inr = load_inr_image(img, size=12, num_regions=2)
    _check_inr(inr, 12, 12, 2)


def test_inr_impossible_segmentation_raises():
    with pytest.raises(ValueError, match="could not cut the image into num_regions=16 regions"):
        load_inr_image("astronaut", size=4, num_regions=16, min_region_fraction=1 / 16)


def test_inr_errors():
    with pytest.raises(ValueError, match="name must be one of .*'eagle'"):
        load_inr_image("eagle")
    with pytest.raises(TypeError, match="name must be an image name .* got int"):
        load_inr_image(3)
    with pytest.raises(ValueError, match=r"name must be a grey \(H, W\), RGB .* got shape \(8, 8, 2\)"):
        load_inr_image(np.ones((8, 8, 2)))
    for bad in (1, (4,), "16", (4, 0)):
        with pytest.raises(ValueError, match="size must be an int >= 2 or a pair"):
            load_inr_image("camera", size=bad)
    with pytest.raises(ValueError, match="num_regions must be a positive int, got 0"):
        load_inr_image("camera", num_regions=0)
    with pytest.raises(ValueError, match="num_regions must be at most the number of pixels 4, got 5"):
        load_inr_image("camera", size=2, num_regions=5, min_region_fraction=0.0)
    with pytest.raises(ValueError, match="seed must be a non-negative int, got -1"):
        load_inr_image("camera", seed=-1)
    with pytest.raises(ValueError, match="position_weight must be a finite number >= 0"):
        load_inr_image("camera", position_weight=-1.0)
    with pytest.raises(ValueError, match=r"min_region_fraction must be a number in \[0, 1/num_regions\]"):
        load_inr_image("camera", num_regions=6, min_region_fraction=0.2)
    with pytest.raises(ValueError, match="min_piece_pixels must be a positive int or None, got 0"):
        load_inr_image("camera", min_piece_pixels=0)
    assert "astronaut" in INR_IMAGES


def test_tiny_files_read_like_the_official_ones(cifar10_root):
    root, _ = cifar10_root
    with open(root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        as_bytes = pickle.load(f, encoding="bytes")
    assert set(as_bytes) == {b"batch_label", b"data", b"filenames", b"labels"}
    assert as_bytes[b"data"].dtype == np.uint8 and as_bytes[b"data"].shape == (3, 3072)


def _expected(entries, name, normalize=True):
    data = np.concatenate([e["data"] for e in entries]).reshape(-1, 3, 32, 32).astype(np.float64) / 255.0
    x = torch.from_numpy(data)
    if normalize:
        x = (x - torch.tensor(CIFAR_MEAN[name], dtype=torch.float64).view(3, 1, 1)) / torch.tensor(
            CIFAR_STD[name], dtype=torch.float64
        ).view(3, 1, 1)
    key = "labels" if name == "cifar10" else "fine_labels"
    y = torch.tensor([lab for e in entries for lab in e[key]], dtype=torch.int64)
    return x, y


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_load_cifar10_values_labels_shapes(cifar10_root, train, normalize):
    root, batches = cifar10_root
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    data = load_cifar("cifar10", root, train=train, normalize=normalize)
    x_ref, y_ref = _expected([batches[n] for n in names], "cifar10", normalize)
    assert data.x.shape == (len(y_ref), 3, 32, 32) and data.x.dtype == torch.float32
    torch.testing.assert_close(data.x.double(), x_ref, rtol=0, atol=1e-6)
    assert torch.equal(data.y, y_ref) and data.y.dtype == torch.int64
    assert data.classes == list(CIFAR10_CLASSES)


@pytest.mark.parametrize("train", [True, False])
def test_load_cifar100_fine_labels_and_partition(cifar100_root, train):
    root, batches = cifar100_root
    data = load_cifar("cifar100", str(root), train=train)
    x_ref, y_ref = _expected([batches["train" if train else "test"]], "cifar100")
    torch.testing.assert_close(data.x.double(), x_ref, rtol=0, atol=1e-6)
    assert torch.equal(data.y, y_ref)
    assert data.classes == list(CIFAR100_CLASSES)
    assert cifar100_cluster_partition(data.classes) == cifar100_cluster_partition()


def test_load_cifar_result_unpacks_as_a_tuple(cifar10_root):
    root, _ = cifar10_root
    data = load_cifar("cifar10", root, train=False)
    x, y, classes = data
    assert x is data.x and y is data.y and classes is data.classes and len(data) == 3 and data[1] is data.y


def test_cifar_dataset_items_match_load_cifar(cifar10_root):
    root, _ = cifar10_root
    data = load_cifar("cifar10", root)
    ds = cifar_dataset("cifar10", root)
    assert len(ds) == len(data.y) == 25 and ds.classes == data.classes and torch.equal(ds.labels, data.y)
    for i in (0, 7, 24):
        x, y = ds[i]
        torch.testing.assert_close(x, data.x[i], rtol=0, atol=1e-6)
        assert y == data.y[i].item() and isinstance(y, int)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 3, 32, 32) and torch.equal(yb, data.y[:4])


def test_cifar_dataset_augmentation_is_a_padded_crop_and_flip(cifar10_root):
    root, _ = cifar10_root
    plain = cifar_dataset("cifar10", root, normalize=False)
    augmented = cifar_dataset("cifar10", root, normalize=False, augment=True)
    torch.manual_seed(0)
    moved = 0
    for i in range(len(plain)):
        x, _ = plain[i]
        out, _ = augmented[i]
        assert out.shape == (3, 32, 32)
        padded = torch.nn.functional.pad(x, (4, 4, 4, 4))  # black border, as before normalisation
        candidates = [padded[:, r : r + 32, c : c + 32] for r in range(9) for c in range(9)]
        candidates += [cand.flip(-1) for cand in candidates]
        assert any(torch.equal(out, cand) for cand in candidates), f"item {i} is not a crop/flip of the image"
        moved += not torch.equal(out, x)
    assert moved > len(plain) // 2, "augmentation must actually move most images"


def test_cifar_dataset_direct_construction_errors():
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with pytest.raises(TypeError, match="images must be a uint8 tensor, got torch.float32"):
        CIFARTensorDataset(images.float(), torch.arange(3), ["a"])
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\) to match images, got \(2,\)"):
        CIFARTensorDataset(images, torch.arange(2), ["a"])
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        CIFARTensorDataset(images, torch.zeros(3), ["a"])
    with pytest.raises(ValueError, match="mean and std must be given together"):
        CIFARTensorDataset(images, torch.arange(3), ["a"], mean=(0.5, 0.5, 0.5))
    with pytest.raises(TypeError, match="augment must be a bool, got 1"):
        CIFARTensorDataset(images, torch.arange(3), ["a"], augment=1)


def test_load_cifar_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="CIFAR-10 root .*nowhere.* does not exist. Pass download=True"):
        load_cifar("cifar10", missing)
    with pytest.raises(FileNotFoundError, match="--download"):
        cifar_dataset("cifar100", missing)


def test_load_cifar_empty_root_lists_missing_files(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"CIFAR-100 not found under .*: missing cifar-100-python/train, "
        r"cifar-100-python/test, cifar-100-python/meta\. .*"
        r"extract cifar-100-python\.tar\.gz",
    ):
        load_cifar("cifar100", tmp_path)


def test_load_cifar_one_missing_batch(cifar10_root):
    root, _ = cifar10_root
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing cifar-10-batches-py/data_batch_3\. "):
        load_cifar("cifar10", root, train=False)


def test_load_cifar_corrupt_file(cifar10_root):
    root, _ = cifar10_root
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="are not CIFAR python pickles"):
        load_cifar("cifar10", root, train=False)


def test_load_cifar_verify_checksums_rejects_tiny_files(cifar10_root):
    root, _ = cifar10_root
    with pytest.raises(ValueError, match="are not the official ones .*MD5"):
        load_cifar("cifar10", root, verify_checksums=True)


def test_load_cifar_argument_errors(cifar10_root):
    root, _ = cifar10_root
    with pytest.raises(ValueError, match="name must be one of .*'cifar20'"):
        load_cifar("cifar20", root)
    with pytest.raises(TypeError, match="root must be a path .* got int"):
        load_cifar("cifar10", 5)
    with pytest.raises(TypeError, match="train must be a bool, got 1"):
        load_cifar("cifar10", root, train=1)
    with pytest.raises(TypeError, match="normalize must be a bool, got None"):
        load_cifar("cifar10", root, normalize=None)


# ------------------------------------------------------------------------------------------- CIFAR-100 clusters


def test_cluster_table_matches_the_paper():
    sizes = [len(c) for c in CIFAR100_CLUSTERS.values()]
    assert sizes == [9, 28, 22, 15, 8, 9, 4, 5]
    assert list(CIFAR100_CLUSTERS) == [
        "Aquatic",
        "People & objects",
        "Mammals",
        "Reptiles & insects",
        "Vehicles",
        "Natural scenes",
        "Fruits",
        "Flowers",
    ]
    every = [c for classes in CIFAR100_CLUSTERS.values() for c in classes]
    assert sorted(every) == sorted(set(every)) == list(CIFAR100_CLASSES)
    assert list(CIFAR100_CLASSES) == sorted(CIFAR100_CLASSES)  # the meta file's order is alphabetical


def test_partition_covers_every_class_once():
    partition = cifar100_cluster_partition(CIFAR100_CLASSES)
    assert [len(g) for g in partition] == [9, 28, 22, 15, 8, 9, 4, 5]
    assert sorted(i for g in partition for i in g) == list(range(100))
    assert all(g == sorted(g) for g in partition)
    assert [CIFAR100_CLASSES[i] for i in partition[6]] == ["apple", "orange", "pear", "sweet_pepper"]


def test_partition_follows_the_given_class_order():
    rng = np.random.default_rng(0)
    names = [n.replace("_", " ").upper() if i % 3 == 0 else n for i, n in enumerate(CIFAR100_CLASSES)]
    order = rng.permutation(100)
    shuffled = [names[i] for i in order]
    partition = cifar100_cluster_partition(shuffled)
    for group, classes in zip(partition, CIFAR100_CLUSTERS.values()):
        assert sorted(CIFAR100_CLASSES[order[i]] for i in group) == sorted(classes)


def test_partition_errors():
    names = list(CIFAR100_CLASSES)
    with pytest.raises(ValueError, match=r"class_names has 'apple' twice \(at 0 and 1\)"):
        cifar100_cluster_partition(["apple"] + names)
    with pytest.raises(ValueError, match=r"missing \['worm'\], unknown \['wyrm'\]"):
        cifar100_cluster_partition(names[:-1] + ["wyrm"])
    with pytest.raises(ValueError, match=r"missing \['apple'\], unknown \[\]"):
        cifar100_cluster_partition(names[1:])
    with pytest.raises(TypeError, match="class_names must be a sequence of class names, got str"):
        cifar100_cluster_partition("apple")
    with pytest.raises(TypeError, match="class_names must hold strings, got 3"):
        cifar100_cluster_partition(names[:-1] + [3])
