"""DiffAugment's ops on [0, 1] images: shapes kept, gradients through, each op doing its one thing."""

import pytest
import torch

from t2i import config as config_lib
from t2i.training.augment import cutout, diff_augment, parse_policy, scale, translation


def test_each_op_keeps_the_shape_and_lets_gradients_through():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 16, 16, requires_grad=True)
    y = diff_augment(x, parse_policy("color,translation,cutout,scale"))
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_translation_shifts_content_and_fills_grey():
    x = torch.zeros(64, 1, 16, 16)
    x[:, :, 6:10, 6:10] = 1.0
    y = translation(x)
    bright = (y == 1.0).sum(dim=(1, 2, 3))
    assert torch.all(bright == 16)                                        # moved, not lost (2 px max)
    assert not all(torch.equal(y[i], x[i]) for i in range(64))            # some images moved
    assert set(y.unique().tolist()) == {0.0, 0.5, 1.0}                     # no new values but the fill
    moved = [i for i in range(64) if not torch.equal(y[i], x[i])]
    # What moved in from outside is the reference's zero of [-1, 1] images: mid-grey.
    assert all(((y[i] == 0.5).sum() > 0) for i in moved)


def test_scale_zooms_about_the_centre_and_fills_grey():
    torch.manual_seed(0)
    x = torch.zeros(64, 1, 32, 32)
    x[:, :, 12:20, 12:20] = 1.0
    y = scale(x)
    mass = y.sum(dim=(1, 2, 3)) - 0.5 * (y == 0.5).sum(dim=(1, 2, 3))   # the square's area, grey fill aside
    assert mass.std() > 1.0                                                # zoomed by a different factor each
    assert 64 * 0.5 < mass.mean() < 64 * 2                                 # around 1x (2^N(0, 0.2^2))
    centre = (y[:, 0, 15:17, 15:17] > 0.9).all(dim=(1, 2))
    assert centre.all()                                                    # about the centre: it stays put
    zoomed_out = y[mass < 60]
    assert len(zoomed_out) and (zoomed_out[:, :, 0, 0] == 0.5).all()      # revealed corners are mid-grey


def test_cutout_blanks_a_quarter_with_grey():
    x = torch.ones(8, 3, 16, 16)
    y = cutout(x)
    grey = (y == 0.5).all(1)
    assert grey.any(dim=(1, 2)).all()                       # every image has a hole
    assert (grey.sum(dim=(1, 2)) <= 64).all()                # at most 8 x 8 of 16 x 16 pixels
    assert ((y == 1.0) | (y == 0.5)).all()


def test_policies_are_checked():
    assert parse_policy("") == () and parse_policy(" translation , cutout ") == ("translation", "cutout")
    with pytest.raises(ValueError, match="unknown augmentation blur"):
        parse_policy("translation,blur")
    with pytest.raises(config_lib.ConfigError, match="loss.augment: unknown augmentation"):
        config_lib.load("gan", ["loss.augment=flip"])
    with pytest.raises(config_lib.ConfigError, match="loss.align_augment: unknown augmentation"):
        config_lib.load("gan", ["loss.align_augment=crop"])
    with pytest.raises(config_lib.ConfigError, match="gan-family settings"):
        config_lib.load("cvae", ["loss.align_augment=translation"])
    with pytest.raises(config_lib.ConfigError, match="gan-family settings"):
        config_lib.load("cvae", ["optim.ema_decay=0.99"])
    with pytest.raises(config_lib.ConfigError, match="ema_decay must be in"):
        config_lib.load("gan", ["optim.ema_decay=1.0"])
